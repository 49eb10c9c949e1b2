"""scripts/benchmark.py --quick: one subprocess run, then the JSON must hold every model x length / context asked."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
MODELS = ["mac", "mag", "mal", "lmm", "swa", "llama"]
LENGTHS = [64, 128]
CONTEXTS = [16, 64]


def run_quick(tmp_path, *extra, timeout=300, env=None):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, SCRIPT, "--quick", "--output", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, out


def check_entries(data, models, lengths, contexts):
    for m in models:
        assert data["models"][m]["params"] > 0
        for L in lengths:
            e = [e for e in data["train"] if e["model"] == m and e["length"] == L]
            assert len(e) == 1, (m, L)
            e = e[0]
            assert e["status"] == "ok", e
            assert e["tokens_per_s"] > 0 and e["median_step_s"] > 0 and e["peak_rss_bytes"] > 0
            assert len(e["steps_s"]) >= 1 and all(s > 0 for s in e["steps_s"])
            assert len(e["load_before"]) == 3 and len(e["load_after"]) == 3
        for C in contexts:
            e = [e for e in data["decode"] if e["model"] == m and e["context"] == C]
            assert len(e) == 1, (m, C)
            e = e[0]
            assert e["status"] == "ok", e
            assert e["tokens_per_s"] > 0 and e["prefill_s"] > 0 and e["peak_rss_bytes"] > 0
            assert e["repeats_identical"], e  # greedy decoding from the same cache is deterministic
            assert all(len(rep) == e["steps"] for rep in e["repeat_step_s"])
        if len(contexts) >= 2:  # both contexts alternating in one process (robust long/short decode ratio)
            (e,) = [e for e in data["decode_interleaved"] if e["model"] == m]
            assert e["status"] == "ok", e
            assert e["ratio_long_short"] > 0 and all(v > 0 for v in e["tokens_per_s"].values())


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    data, stdout, out = run_quick(tmp_path)
    assert data["plan"]["models"] == MODELS
    assert data["plan"]["lengths"] == LENGTHS and data["plan"]["decode_contexts"] == CONTEXTS
    check_entries(data, MODELS, LENGTHS, CONTEXTS)
    # same dimensions for every model; Titans variants have the memory's extra parameters
    assert data["models"]["mag"]["params"] > data["models"]["swa"]["params"]
    for key in ("torch", "transformers", "cpu_count", "python"):
        assert data["meta"][key]
    assert "benchmark.py" in data["command"] and "--quick" in data["command"]
    # the children import a private snapshot of the model code, taken once at start
    assert data["model_code"]["commit"] and data["model_code"]["files"]["modeling_titans.py"]["sha256"]
    assert "titans-bench-code-" in data["models"]["mag"]["modeling_titans_file"]
    assert data["summary"]["rows"], "ratio table missing"
    assert os.path.getsize(out.with_suffix(".png")) > 1000
    assert "Ratios and targets" in stdout
    replot = tmp_path / "replot.png"
    proc = subprocess.run([sys.executable, SCRIPT, "--replot", str(out), "--plot", str(replot)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and os.path.getsize(replot) > 1000, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("titans_pytorch") is None, reason="titans-pytorch not installed")
def test_benchmark_quick_titans_pytorch(tmp_path):
    data, _, _ = run_quick(
        tmp_path, "--models", "mag,titans-pytorch", "--with-titans-pytorch", "--lengths", "64", "--plot", "none"
    )
    check_entries(data, ["mag", "titans-pytorch"], [64], CONTEXTS)
    tp = [e for e in data["decode"] if e["model"] == "titans-pytorch"]
    assert all(e["tp_sample_tokens_match"] for e in tp)  # our timing loop is exactly its sample(use_cache=True)
    names = [r["name"] for r in data["summary"]["rows"]]
    assert any("mag / titans-pytorch tok/s" in n for n in names)


@pytest.mark.slow
def test_benchmark_decode_only_with_compiled_memory(tmp_path):
    """--no-train with TITANS_MEMORY_KERNEL=compile (the compiled one-token memory step): decoding rows only, the
    kernel mode recorded in the plan, a plot without training panels."""
    data, stdout, out = run_quick(
        tmp_path, "--models", "mag", "--no-train", "--decode-contexts", "16", "--no-decode-interleaved",
        env={"TITANS_MEMORY_KERNEL": "compile"},
    )  # fmt: skip
    assert data["plan"]["memory_kernel"] == "compile" and data["plan"]["lengths"] == [] and data["train"] == []
    check_entries(data, ["mag"], [], [16])
    assert os.path.getsize(out.with_suffix(".png")) > 1000 and "Ratios and targets" in stdout


def test_benchmark_trains_through_torch_compile(tmp_path):
    """--torch-compile BACKEND trains every HF model through torch.compile(model) (dynamo's aot_eager backend here:
    the same capture as inductor without its C++ compile), recorded in the plan and the table's title."""
    data, stdout, _ = run_quick(
        tmp_path, "--models", "mag,llama", "--lengths", "64", "--no-decode", "--plot", "none",
        "--torch-compile", "aot_eager",
    )  # fmt: skip
    assert data["plan"]["torch_compile"] == "aot_eager" and "torch.compile(model, backend='aot_eager')" in stdout
    check_entries(data, ["mag", "llama"], [64], [])
    assert all(e["compiled_graphs"] >= 1 for e in data["train"])
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--torch-compile", "--flops"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--flops counts the eager step" in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--torch-compile", "aot_eager", "--torch-compile-mode",
                           "reduce-overhead"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--torch-compile-mode is inductor's" in proc.stderr


def test_benchmark_skips_and_records_failures(tmp_path):
    """A child that exceeds --timeout is killed by the watchdog and recorded as such, not a crash."""
    data, _, _ = run_quick(
        tmp_path, "--models", "swa", "--lengths", "64", "--no-decode", "--plot", "none", "--timeout", "0.5"
    )
    (e,) = data["train"]
    assert e["status"].startswith("timeout"), e


@pytest.mark.slow
def test_benchmark_decode_under_inference_mode(tmp_path):
    """--inference-mode decodes under torch.inference_mode (every model alike, titans-pytorch too when installed):
    recorded in the plan, and the same greedy tokens as the default torch.no_grad run."""
    models = "mac,mag" + (",titans-pytorch" if importlib.util.find_spec("titans_pytorch") else "")
    common = ("--models", models, "--with-titans-pytorch", "--no-train", "--decode-contexts", "16",
              "--no-decode-interleaved", "--plot", "none")  # fmt: skip
    data, stdout, _ = run_quick(tmp_path, *common, "--inference-mode")
    (tmp_path / "base").mkdir()
    base, _, _ = run_quick(tmp_path / "base", *common)
    assert data["plan"]["inference_mode"] and not base["plan"]["inference_mode"]
    assert "torch.inference_mode" in stdout
    check_entries(data, models.split(","), [], [16])
    assert all(e["inference_mode"] for e in data["decode"]) and not any(e["inference_mode"] for e in base["decode"])
    tokens = lambda d: {e["model"]: e["tokens_head"] for e in d["decode"]}  # noqa: E731
    assert tokens(data) == tokens(base)


@pytest.mark.slow
def test_benchmark_rounds_report_the_median_round(tmp_path):
    """--rounds 3: each point is measured three times (model order reversed in the second round); the JSON keeps all
    six decode entries and reports, per point, the round with the median tokens/s."""
    data, stdout, _ = run_quick(tmp_path, "--models", "mag,swa", "--no-train", "--decode-contexts", "16",
                                "--no-decode-interleaved", "--rounds", "3", "--plot", "none")  # fmt: skip
    assert data["plan"]["rounds"] == 3 and "the round with the median of 3" in stdout
    check_entries(data, ["mag", "swa"], [], [16])
    raw = data["rounds"]["decode"]
    assert sorted(e["round"] for e in raw) == [0, 0, 1, 1, 2, 2]
    assert [e["model"] for e in raw] == ["mag", "swa", "swa", "mag", "mag", "swa"]  # measured in this order
    for e in data["decode"]:
        values = sorted(r["tokens_per_s"] for r in raw if r["model"] == e["model"])
        assert e["tokens_per_s"] == values[1] and sorted(e["rounds_values"]["tokens_per_s"]) == values


def test_benchmark_profile_of_a_mixed_precision_training_step(tmp_path):
    """--profile MODEL:LEN alone (no timed rows): a torch.profiler table of one training step, stored in the JSON
    (what scripts/gpu_checks.sh's `profile` stage reads on a GPU), under the same bf16 autocast as the timed steps:
    autocast's casts show up as more aten::_to_copy calls than in an fp32 step."""
    casts = {}
    for dtype in ("bfloat16", "float32"):
        (tmp_path / dtype).mkdir()
        data, stdout, _ = run_quick(tmp_path / dtype, "--models", "mag", "--no-train", "--no-decode", "--profile",
                                    "mag:64", "--profile-rows", "200", "--dtype", dtype, "--plot", "none")  # fmt: skip
        (prof,) = data["profiles"]
        assert prof["status"] == "ok" and prof["mode"] == "train" and prof["length"] == 64, prof
        assert prof["sort_by"] == "self_cpu_time_total" and "Self CPU" in prof["table"]
        assert data["train"] == [] and data["decode"] == [] and "profile mag:64" in stdout
        casts[dtype] = sum(op["calls"] for op in prof["top_ops"] if op["name"] == "aten::_to_copy")
    assert casts["bfloat16"] > casts["float32"], casts  # deterministic counts: equal without autocast


def test_benchmark_extra_model_by_name(tmp_path):
    """mac_sliding is not in the default set, runs when named, and is MAC with mac_attention="sliding" (D20); the
    JSON's plan records the TITANS_* environment of the run."""
    data, _, _ = run_quick(tmp_path, "--models", "mac_sliding", "--lengths", "64", "--no-decode", "--plot", "none",
                           env={"TITANS_MEMORY_KERNEL_BLOCK": "32"})  # fmt: skip
    # the TITANS_* settings the workers ran under are recorded (here one that CPU runs ignore)
    assert data["plan"]["titans_environment"]["TITANS_MEMORY_KERNEL_BLOCK"] == "32"
    config = data["models"]["mac_sliding"]["config"]
    assert config["variant"] == "mac" and config["mac_attention"] == "sliding"
    check_entries(data, ["mac_sliding"], [64], [])


def test_benchmark_no_trim_models(tmp_path):
    """`<variant>_no_trim` is that variant with TITANS_MALLOC_TRIM=0 in its worker processes (and only there)."""
    data, _, _ = run_quick(tmp_path, "--models", "mag,mag_no_trim", "--lengths", "64", "--no-decode", "--plot", "none")
    assert data["models"]["mag_no_trim"]["config"] == data["models"]["mag"]["config"]
    assert data["models"]["mag_no_trim"]["env"]["TITANS_MALLOC_TRIM"] == "0"
    assert data["models"]["mag"]["env"].get("TITANS_MALLOC_TRIM") == os.environ.get("TITANS_MALLOC_TRIM")
    check_entries(data, ["mag", "mag_no_trim"], [64], [])


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("titans_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_sdpa_flops_are_those_of_the_math_path(monkeypatch):
    """The CPU flash kernel's registered count equals the matmuls of sdpa's math path for the same call (QKᵀ and PV),
    and its backward is counted with torch's sdpa backward formula."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import sdpa_backward_flop_count

    bench = _load_benchmark()
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    counts = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            counts[backend] = bench.count_step_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    flash, math = counts[SDPBackend.FLASH_ATTENTION], counts[SDPBackend.MATH]
    assert "_scaled_dot_product_flash_attention_for_cpu" in flash["flops_by_op"], flash
    assert flash["flops"] == math["flops"] == 2 * 2 * (2 * 3) * 40 * 40 * 16, (flash, math)
    qg = q.clone().requires_grad_()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        counted = bench.count_step_flops(lambda: torch.nn.functional.scaled_dot_product_attention(qg, k, v).sum().backward())
    assert counted["flops_by_op"]["_scaled_dot_product_flash_attention_for_cpu_backward"] == sdpa_backward_flop_count(
        q.shape, q.shape, k.shape, v.shape
    )
    # the count runs the memory's PyTorch scan (the counter cannot see compiled or Triton kernels), then restores
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "compile")
    seen = []
    bench.count_step_flops(lambda: seen.append(os.environ["TITANS_MEMORY_KERNEL"]))
    assert seen == ["torch"] and os.environ["TITANS_MEMORY_KERNEL"] == "compile"


def test_benchmark_flops(tmp_path):
    """--flops: Llama's matmuls are exactly 6 x (linear parameters) x tokens (2 forward, 4 backward), its attention
    grows with the square of the length, the Titans models' counts are affine in the length (window attention,
    chunked memory, plus the persistent tokens' projections once per step), and every throughput ratio gets its FLOP
    bound."""
    data, stdout, _ = run_quick(tmp_path, "--models", "mag,swa,llama", "--lengths", "64,128,192", "--no-decode", "--flops",
                                "--plot", "none")  # fmt: skip
    dims, batch = data["plan"]["dims"], data["plan"]["batch"]
    e = {(r["model"], r["length"]): r for r in data["train"]}
    h, i, heads, hd, vocab = (dims[k] for k in ("hidden_size", "intermediate_size", "num_heads", "head_dim", "vocab_size"))
    linear = dims["num_layers"] * (4 * h * heads * hd + 3 * h * i) + h * vocab  # q, k, v, o, MLP; lm_head
    for L in (64, 128, 192):
        assert e["llama", L]["flops_by_op"]["mm"] == 6 * linear * batch * L
        assert e["llama", L]["flops"] > e["llama", L]["flops_by_op"]["mm"]  # + attention
    attention = lambda L: e["llama", L]["flops"] - e["llama", L]["flops_by_op"]["mm"]  # noqa: E731
    assert attention(128) == 4 * attention(64) and attention(192) == 9 * attention(64)
    for m in ("mag", "swa"):
        assert e[m, 192]["flops"] - e[m, 128]["flops"] == e[m, 128]["flops"] - e[m, 64]["flops"], m
        assert e[m, 64]["flops_per_token"] == e[m, 64]["flops"] / (batch * 64)
        assert e[m, 64]["achieved_flops_per_s"] > 0
    assert e["mag", 64]["flops_by_op"]["bmm"] > 100 * e["swa", 64]["flops_by_op"].get("bmm", 1)  # the memory's scan
    (row,) = [r for r in data["summary"]["rows"] if r["name"].startswith("mag / swa")]
    assert row["flop_bound"] == e["swa", 64]["flops_per_token"] / e["mag", 64]["flops_per_token"]
    assert "Training FLOPs" in stdout and "[FLOP bound" in stdout


def _summary_rows(models, lengths, train, contexts=(), decode=(), batch=4, dims=None):
    """`summarize` of hand-made entries of a CPU run (no measurement): its rows."""
    plan = dict(lengths=lengths, batch=batch, decode_contexts=list(contexts), models=models, device="cpu")
    if dims is not None:
        plan["dims"] = dims
    data = dict(plan=plan, train=train, decode=list(decode), decode_interleaved=[])
    return _load_benchmark().summarize(data)["rows"]


@pytest.mark.parametrize(
    "lengths, expected",
    [([1024, 4096], {1024: ">= 5", 4096: ">= 10"}), ([4096], {4096: ">= 10"}), ([1024], {1024: ">= 5"})],
)
def test_titans_pytorch_targets_follow_the_measured_lengths(lengths, expected):
    """The issue's targets against titans-pytorch are >= 5x at 1,024 tokens and >= 10x at 4,096: a run at 4,096
    only is judged against >= 10 alone (it used to print a >= 5 row for 4,096 as well)."""
    train = [dict(model=m, length=L, status="ok", tokens_per_s=tps * L / 1024)
             for L in lengths for m, tps in (("mac", 800.0), ("titans-pytorch", 100.0))]  # fmt: skip
    rows = _summary_rows(["mac", "titans-pytorch"], lengths, train)
    rows = [r for r in rows if r["name"].startswith("mac / titans-pytorch")]
    assert [(int(r["name"].rsplit("x", 1)[1]), r["target"]) for r in rows] == list(expected.items())
    assert all(r["value"] == pytest.approx(8.0) and r["passed"] == (r["target"] == ">= 5") for r in rows)


def test_anchor_document_figures_only_at_the_anchor_size():
    """The anchor document's titans-pytorch tok/s were measured at the anchor dimensions and batch 4: a run at another
    width or batch is not compared with them (it printed mag / anchor-doc titans-pytorch at hidden 1024, batch 1), nor
    judged against the RSS target."""
    anchor = _load_benchmark().FULL_DIMS
    wide = dict(anchor, hidden_size=1024)

    def anchor_rows(dims, batch):
        train = [dict(model="mag", length=1024, status="ok", tokens_per_s=3000.0)]
        decode = [dict(model="mag", context=128, status="ok", tokens_per_s=200.0)]
        rows = _summary_rows(["mag"], [1024], train, [128], decode, batch=batch, dims=dims)
        return [r["name"] for r in rows if "anchor-doc" in r["name"]]

    assert len(anchor_rows(anchor, 4)) == 2  # training at 1,024 and decoding at context 128
    assert anchor_rows(wide, 4) == []
    assert anchor_rows(anchor, 1) == [r for r in anchor_rows(anchor, 4) if "decode" in r]
    # so is the RSS target (<= 3 GiB at the anchor size): a wider model is not judged against it
    train = [dict(model="mag", length=4096, status="ok", tokens_per_s=1.0, peak_rss_bytes=3.5 * 1024**3)]
    for dims, target in ((anchor, "<= 3 GiB"), (wide, None)):
        (row,) = [r for r in _summary_rows(["mag"], [4096], train, dims=dims) if "peak RSS" in r["name"]]
        assert row["target"] == target and row["passed"] is (False if target else None)


def test_no_trim_rows_compare_with_their_variant_without_targets():
    """A `<variant>_no_trim` model is compared with its own variant and with titans-pytorch at every length, as plain
    ratios: the issue's targets are for the default model, so these rows pass or fail nothing."""
    speeds = {"mac": 1500.0, "mac_no_trim": 1800.0, "titans-pytorch": 150.0}
    train = [dict(model=m, length=4096, status="ok", tokens_per_s=v) for m, v in speeds.items()]
    rows = {r["name"]: r for r in _summary_rows(list(speeds), [4096], train) if r["group"] == "heap trimming off"}
    assert set(rows) == {"mac_no_trim / mac tok/s @ 4x4096", "mac_no_trim / titans-pytorch tok/s @ 4x4096"}
    assert rows["mac_no_trim / mac tok/s @ 4x4096"]["value"] == pytest.approx(1.2)
    assert rows["mac_no_trim / titans-pytorch tok/s @ 4x4096"]["value"] == pytest.approx(12.0)
    assert all(r["target"] is None and r["passed"] is None for r in rows.values())


def test_count_ops_launches_do_not_grow_with_the_length(monkeypatch):
    """scripts/count_ops.py on the meta device (the accelerator's Python path): a training step of the memory-disabled
    model and of MAG makes as many kernel calls at 4x the length, the fused scan two launches per memory layer, no
    host read; the PyTorch scan's chunk loop does grow (the count sees per-length work)."""
    spec = importlib.util.spec_from_file_location("titans_count_ops_script", os.path.join(ROOT, "scripts", "count_ops.py"))
    count_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(count_ops)
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "compile")  # overridden inside the count, restored after it
    monkeypatch.setattr(count_ops.mt, "_PIECE_ELEMENTS", 2 * 32 * 16)  # on the CPU: pieces of 16 tokens
    dims = dict(count_ops.benchmark.QUICK_DIMS, num_layers=2)
    for model in ("swa", "mag"):
        short, long = (count_ops.count_step(model, dims, n, 2) for n in (64, 256))
        assert short["kernel_calls"] == long["kernel_calls"] > 0, (short, long)
        assert short["host_reads"] == 0
        assert sum(long["triton_launches"].values()) == (4 if model == "mag" else 0), long
    short, long = (count_ops.count_step("mag", dims, n, 2, triton=False) for n in (64, 256))
    assert long["kernel_calls"] > short["kernel_calls"] and not long["triton_launches"]
    assert os.environ["TITANS_MEMORY_KERNEL"] == "compile"
    # the CLI prints a row per model and length and writes them
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "count_ops.py"), "--models", "swa,llama",
                          "--lengths", "64", "--hidden-size", "32", "--intermediate-size", "96"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split()[:2] for line in out.stdout.splitlines()[1:]] == [["swa", "64"], ["llama", "64"]], out.stdout


def test_tf32_emulation_rounds_the_scan_products(monkeypatch, tmp_path):
    """scripts/tf32_emulation.py: `to_tf32` keeps 10 mantissa bits, rounding to nearest with ties to even, and the scan
    with its products so rounded errs like tf32 (1e-5 to 1e-2 relative to fp64), far above the fp32 scan (under 1e-5):
    the rounding reaches the scan's products, forward and backward, and only them."""
    import torch

    spec = importlib.util.spec_from_file_location("titans_tf32_script", os.path.join(ROOT, "scripts", "tf32_emulation.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ulp = 2.0**-10  # tf32's spacing above 1
    x = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2.0**-20, -(1 + ulp / 4), 3.0])
    expected = torch.tensor([1.0, 1 + 2 * ulp, 1 + ulp, -1.0, 3.0])  # ties to even, above the tie up, below it down
    assert torch.equal(script.to_tf32(x), expected)
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "auto")  # the script sets `torch` for its run
    out = tmp_path / "tf32.json"
    result = script.main(["--lengths", "128", "--output", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == result["rows"] and [(r["gates"], r["chunks"]) for r in rows] == [("model", 2), ("check", 2)]
    assert 0.98 < rows[0]["keep_per_token"] < 0.995  # gates as at initialisation: the state persists
    for row in rows:
        for group in ("outputs", "outputs_and_states", "gradients"):
            assert row["fp32"][group] < 1e-5 and 1e-5 < row["tf32"][group] < 1e-2, (group, row)
    assert script.mt._scan_forward.__name__ == "_scan_forward"  # the tf32 wrapper is gone after the run


def test_memory_kernel_fallbacks_are_recorded_and_flagged(tmp_path, monkeypatch):
    """Under TITANS_MEMORY_KERNEL=auto a fused kernel that fails to compile only warns and runs the PyTorch chunk loop,
    which is many times slower: each result then names the failed configurations, and the tables say so."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import benchmark

    import modeling_titans

    monkeypatch.setattr(modeling_titans, "_TRITON_FAILED", {})  # whatever other tests left there
    assert benchmark.memory_kernel_failures() == {}
    key = (False, 2, 64, 128, 64, "silu", True, "cuda:0")
    modeling_titans._TRITON_FAILED[key] = "OutOfResources('shared memory')"
    assert benchmark.memory_kernel_failures() == {str(key): "OutOfResources('shared memory')"}
    data = json.loads(open(os.path.join(ROOT, "results", "benchmark_gpu_h200_c65167b_kernel.json")).read())
    (mag,) = [e for e in data["train"] if e["model"] == "mag" and e["length"] == 4096]
    mag["memory_kernel_failures"] = benchmark.memory_kernel_failures()
    (tmp_path / "fell_back.json").write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, SCRIPT, "--replot", str(tmp_path / "fell_back.json"), "--plot",
                           str(tmp_path / "fell_back.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("WARNING")]
    assert warnings == [f"WARNING mag: the fused memory kernel failed for {key}; that scan ran the PyTorch chunk loop"]
