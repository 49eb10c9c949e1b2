# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Speed and memory benchmark: Titans (MAC/MAG/MAL/LMM) vs memory-disabled Titans vs Llama vs titans-pytorch.

In one run, on the same dimensions (the anchor configuration of the design note anchor-titans-pytorch.md §2, in
../shared/design beside the repository: vocab 256, hidden 256, 2 layers, 4 heads x 64, window/segment 64,
4 persistent tokens, memory 4 heads x 64, memory chunk 64), it measures

* training throughput: tokens/s of one forward+backward at batch 4 (loss on every position, no optimiser step),
  and peak memory (CPU: `ru_maxrss` of the child process that did the measurement; GPU:
  `torch.cuda.max_memory_allocated`) at sequence lengths 512 ... 8192;
* cached greedy decoding at batch 1: prefill a context of 128 and of 8192 tokens, then time N single-token steps
  (`model(...)` with a `TitansCache`; `DynamicCache` for Llama; titans-pytorch's own cached forward, exactly the
  loop of its `sample(..., use_cache=True, temperature=0.)`, which is also timed once as a cross-check).

Models: `mac`, `mag`, `mal`, `lmm` (TitansForCausalLM), `swa` (Titans with `memory_layers=[]`: a sliding-window
attention model), `llama` (LlamaForCausalLM of the same size, sdpa; flash-attention-2 on GPU when installed) and
`titans-pytorch` (`MemoryAsContextTransformer`, anchor configuration, when `titans_pytorch` is importable).

Every measurement (model x length, model x context) runs in its own fresh subprocess, so its peak RSS is its own;
every figure is a median over timed steps after warm-up; all raw step times, the load average before/after each
measurement, machine info and versions go to the JSON (and, on CUDA, the fused memory kernel configurations that
failed and fell back to the PyTorch scan: `memory_kernel_failures`, also printed as a WARNING). A plot (tokens/s and
peak RSS vs length, decode bars) and a table of ratios with pass/fail against the targets of the "Speed and memory"
issue are written/printed at the end.

    .venv/bin/python scripts/benchmark.py --output results/benchmark.json          # full run (CPU: ~1 h, 2 cores)
    .venv/bin/python scripts/benchmark.py --quick --output /tmp/bench.json         # seconds; CI
    .venv/bin/python scripts/benchmark.py --models mag,swa --lengths 1024 --decode-contexts 128
    .venv/bin/python scripts/benchmark.py --models mag --lengths 4096 --no-decode --profile mag:4096

`--profile MODEL:LEN` adds a torch.profiler table (self CPU time) of one training step of MODEL at LEN. `--flops`
counts the FLOPs of one (untimed) training step per point, and prints each model's achieved FLOP/s and, beside every
throughput ratio, its FLOP bound: the ratio that equal FLOP/s would give.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITANS_VARIANTS = ("mac", "mag", "mal", "lmm")
ALL_MODELS = (*TITANS_VARIANTS, "swa", "llama", "titans-pytorch")
# each variant with the heap trimming of long CPU training inputs turned off (TITANS_MALLOC_TRIM=0 in its processes:
# the speed it costs, the RSS it saves): name -> variant
NO_TRIM_MODELS = {f"{v}_no_trim": v for v in TITANS_VARIANTS}
EXTRA_MODELS = ("mac_sliding", *NO_TRIM_MODELS)  # by name only; mac_sliding: mac_attention="sliding" (model card D20)
# TitansConfig fields of the Titans-built models that are not a variant of their own name
TITANS_OVERRIDES = {
    "swa": dict(variant="mag", memory_layers=[]),
    "mac_sliding": dict(variant="mac", mac_attention="sliding"),
    **{m: dict(variant=v) for m, v in NO_TRIM_MODELS.items()},
}
# environment of a model's worker processes, over the parent's
MODEL_ENV = {m: dict(TITANS_MALLOC_TRIM="0") for m in NO_TRIM_MODELS}
GIB = 1024**3

# titans-pytorch figures of the anchor document (§2, same CPU class, batch 4): used when it is not measured here
ANCHOR_TP_TOKENS_PER_S = {1024: 552.0, 4096: 205.0}
ANCHOR_TP_DECODE_TOKENS_PER_S = 50.1  # sample(..., use_cache=True), 512-token prompt, 128 new tokens

FULL_DIMS = dict(
    vocab_size=256, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4, head_dim=64, window=64,
    persistent_tokens=4, memory_heads=4, memory_head_dim=64, memory_chunk=64, memory_depth=2, memory_expansion=2,
    longterm_mem_tokens=4,
)  # fmt: skip
QUICK_DIMS = dict(
    vocab_size=256, hidden_size=32, intermediate_size=96, num_layers=1, num_heads=2, head_dim=16, window=16,
    persistent_tokens=2, memory_heads=2, memory_head_dim=16, memory_chunk=8, memory_depth=2, memory_expansion=2,
    longterm_mem_tokens=2,
)  # fmt: skip


# ================================================================================================================
# Worker side: runs inside a fresh subprocess, builds one model, runs its tasks, writes results after every step.
# ================================================================================================================


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_kernel_failures() -> dict:
    """The fused memory kernels' configurations that failed in this process and fell back to the PyTorch scan
    (`modeling_titans._TRITON_FAILED`: under TITANS_MEMORY_KERNEL=auto a failure only warns), as {key: error}."""
    failed = getattr(sys.modules.get("modeling_titans"), "_TRITON_FAILED", None) or {}
    return {str(key): error for key, error in failed.items()}


def _import_titans(code_dir=None):
    if "modeling_titans" not in sys.modules:
        sys.path.insert(0, code_dir or ROOT)  # the snapshot of the model code taken when the run started
    from configuration_titans import TitansConfig
    from modeling_titans import TitansCache, TitansForCausalLM

    return TitansConfig, TitansForCausalLM, TitansCache


def build_model(name: str, dims: dict, max_len: int, device: str, attn: str | None, code_dir: str | None = None,
                titans_attn: str | None = None):
    """Returns (model, family, description). family: 'hf' or 'tp'."""
    import torch

    if name in TITANS_VARIANTS or name in TITANS_OVERRIDES:
        TitansConfig, TitansForCausalLM, _ = _import_titans(code_dir)
        config = TitansConfig(
            **TITANS_OVERRIDES.get(name, dict(variant=name)),
            vocab_size=dims["vocab_size"],
            hidden_size=dims["hidden_size"],
            intermediate_size=dims["intermediate_size"],
            num_hidden_layers=dims["num_layers"],
            num_attention_heads=dims["num_heads"],
            head_dim=dims["head_dim"],
            attention_window=dims["window"],
            num_persistent_tokens=dims["persistent_tokens"],
            num_memory_heads=dims["memory_heads"],
            memory_head_dim=dims["memory_head_dim"],
            memory_chunk_size=dims["memory_chunk"],
            memory_depth=dims["memory_depth"],
            memory_expansion=dims["memory_expansion"],
            # the default 0.02 at the anchor's chunk of 64 tokens draws the config's divergence warning; the bound
            # only scales the learning rates, so the speed is the same
            memory_max_lr=min(0.02, 1.0 / dims["memory_chunk"]),
            max_position_embeddings=max_len,
            attn_implementation=titans_attn or attn or "sdpa",
        )
        torch.manual_seed(0)
        model = TitansForCausalLM(config)
        return model.to(device), "hf", config.to_dict()
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        if attn is None:
            attn = "sdpa"
            if device.startswith("cuda"):
                try:
                    import flash_attn  # noqa: F401

                    attn = "flash_attention_2"
                except ImportError:
                    pass
        config = LlamaConfig(
            vocab_size=dims["vocab_size"],
            hidden_size=dims["hidden_size"],
            intermediate_size=dims["intermediate_size"],
            num_hidden_layers=dims["num_layers"],
            num_attention_heads=dims["num_heads"],
            num_key_value_heads=dims["num_heads"],
            head_dim=dims["head_dim"],
            max_position_embeddings=max_len,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attn_implementation=attn,
        )
        torch.manual_seed(0)
        dtype = torch.bfloat16 if attn.startswith("flash") else None
        model = LlamaForCausalLM(config)
        if dtype is not None:  # flash-attention kernels need half precision
            model = model.to(dtype)
        return model.to(device), "hf", config.to_dict()
    if name == "titans-pytorch":
        from titans_pytorch import MemoryAsContextTransformer

        kwargs = dict(
            num_tokens=dims["vocab_size"],
            dim=dims["hidden_size"],
            depth=dims["num_layers"],
            heads=dims["num_heads"],
            dim_head=dims["head_dim"],
            segment_len=dims["window"],
            num_persist_mem_tokens=dims["persistent_tokens"],
            num_longterm_mem_tokens=dims["longterm_mem_tokens"],
            neural_memory_layers=tuple(range(1, dims["num_layers"] + 1)),
        )
        torch.manual_seed(0)
        model = MemoryAsContextTransformer(**kwargs)
        return model.to(device), "tp", {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    raise ValueError(f"unknown model {name!r}; choose from {ALL_MODELS}")


def count_params(model, family: str) -> dict:
    params = list(model.parameters())  # deduplicated (tied embeddings count once)
    total = sum(p.numel() for p in params)
    emb = 0
    if family == "hf":
        emb = model.get_input_embeddings().weight.numel()
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            emb += out.weight.numel()
    else:
        emb = model.token_emb.weight.numel() + model.to_logits.weight.numel()
    return {"params": total, "params_non_embedding": total - emb}


class _Sync:
    def __init__(self, device):
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def __call__(self):
        if self.cuda:
            self.torch.cuda.synchronize()


def _gpu_mem(device) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {}
    return {
        "peak_gpu_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "peak_gpu_reserved_bytes": int(torch.cuda.max_memory_reserved()),
    }


def _no_grad(spec):
    """Decoding runs without autograd: `generate()`'s own torch.no_grad, or torch.inference_mode (--inference-mode,
    every model alike), which skips autograd's view and version bookkeeping on every op."""
    import torch

    return torch.inference_mode() if spec.get("inference_mode") else torch.no_grad()


def _amp(spec):
    """bf16 mixed precision (`--dtype bfloat16`): fp32 weights, `torch.autocast` around the forward, as Trainer's
    --bf16 does. Titans keeps its memory's inner optimisation in fp32 under autocast (model card D16)."""
    import contextlib

    import torch

    if spec.get("dtype", "float32") == "float32":
        return contextlib.nullcontext()
    return torch.autocast(spec["device"].split(":")[0], dtype=getattr(torch, spec["dtype"]))


def _register_cpu_sdpa_flops() -> None:
    """torch's FlopCounterMode knows the CUDA sdpa kernels but not the CPU flash kernel that sdpa dispatches to here:
    count it with torch's own sdpa formulas (dense: every query x key product, masks and causality not subtracted,
    as torch counts the CUDA kernels). Once per process (torch refuses a second registration)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_step_flops(step) -> dict:
    """Floating-point operations of one call of `step` (a training step: forward + backward), counted per aten op by
    torch.utils.flop_counter (matmuls and attention; elementwise work is not counted). The Titans memory runs its
    PyTorch scan for the count (TITANS_MEMORY_KERNEL=torch): compiled graphs and Triton kernels are invisible to the
    counter, and they do the same matmuls."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    counter = FlopCounterMode(display=False)
    with mock.patch.dict(os.environ, {"TITANS_MEMORY_KERNEL": "torch"}), counter:  # restores the environment after
        step()
    by_op = {str(op).split(".", 1)[-1]: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "flops_by_op": by_op}


def task_train(model, family, spec, task, emit):
    import torch

    device, L, batch = spec["device"], task["length"], task["batch"]
    sync = _Sync(device)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randint(0, spec["dims"]["vocab_size"], (batch, L + 1), generator=gen).to(device)
    model.train()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # --torch-compile: the whole model through torch.compile, as Trainer's `torch_compile=True` does (the first
    # warm-up step pays for the compile)
    backend, mode = spec.get("torch_compile"), spec.get("torch_compile_mode")
    forward = torch.compile(model, backend=backend, mode=mode) if backend and family == "hf" else model

    def step():
        sync()
        t0 = time.perf_counter()
        with _amp(spec):
            if family == "tp":
                loss = model(x, return_loss=True)  # shifts internally: L positions in, L predictions
            else:
                ids = x[:, :L]
                loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        return t1 - t0, t2 - t1

    res = {"kind": "train", "model": spec["model"], "length": L, "batch": batch, "warmup_s": [], "steps_s": [],
           "fwd_s": [], "bwd_s": [], "status": "running"}  # fmt: skip
    warmup, min_steps, max_steps = task["warmup"], task["min_steps"], task["max_steps"]
    capped = False
    for i in range(warmup):
        f, b = step()
        res["warmup_s"].append(f + b)
        emit(res)
        if f + b > task["slow_step_s"] and not (i == 0 and forward is not model):  # (a compiling step is slow)
            # a very slow step: 1 warm-up and the minimum of timed steps
            capped = True
            break
    if capped:
        max_steps = min_steps = task["capped_steps"]
    timed = 0.0
    while len(res["steps_s"]) < max_steps:
        f, b = step()
        res["steps_s"].append(f + b)
        res["fwd_s"].append(f)
        res["bwd_s"].append(b)
        timed += f + b
        res.update(_gpu_mem(device))
        res["peak_rss_bytes"] = _peak_rss_bytes()
        emit(res)
        if len(res["steps_s"]) >= min_steps and timed >= task["step_budget_s"]:
            break
    med = statistics.median(res["steps_s"])
    if forward is not model:  # graphs dynamo captured (graph breaks make several)
        from torch._dynamo.utils import counters

        res["compiled_graphs"] = counters["stats"]["unique_graphs"]
    res.update(
        status="ok",
        capped=capped,
        median_step_s=med,
        median_fwd_s=statistics.median(res["fwd_s"]),
        median_bwd_s=statistics.median(res["bwd_s"]),
        tokens_per_s=batch * L / med,
        peak_rss_bytes=_peak_rss_bytes(),
        **_gpu_mem(device),
    )
    if task.get("flops"):  # after the figures above: the counted step is neither timed nor in the peak memory
        res.update(count_step_flops(step))
        res["flops_per_token"] = res["flops"] / (batch * L)
        res["achieved_flops_per_s"] = res["flops"] / med
    return res


def _hf_decode(model, spec, task, prompt, res, emit):
    import torch

    sync = _Sync(spec["device"])
    name = spec["model"]
    if name == "llama":
        from transformers import DynamicCache

        new_cache = lambda: DynamicCache(config=model.config)  # noqa: E731
    else:
        TitansCache = _import_titans()[2]
        new_cache = lambda: TitansCache(model.config)  # noqa: E731

    sync()
    t0 = time.perf_counter()
    out = model(input_ids=prompt, past_key_values=new_cache(), use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:].argmax(-1)
    sync()
    res["prefill_s"] = time.perf_counter() - t0
    base = out.past_key_values
    res["cache_type"] = type(base).__name__

    def run(n):
        cache, tok, steps, toks = copy.deepcopy(base), first, [], []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            cache = out.past_key_values
            sync()
            steps.append(time.perf_counter() - t)
            toks.append(int(tok))
        return steps, toks

    return run


def _tp_decode(model, spec, task, prompt, res, emit):
    import torch

    sync = _Sync(spec["device"])
    n_max = max(task["steps"], task["warmup_steps"]) + 1
    total = prompt.shape[-1] + n_max
    axial_dims = model.axial_pos_emb.maybe_derive_outer_dim(
        model.seq_len_with_longterm_mem(total), (model.neural_memory_segment_len,)
    )
    factorized = model.axial_pos_emb(axial_dims, return_factorized=True)
    fwd = lambda seq, cache: model(  # noqa: E731
        seq, disable_flex_attn=True, cache=cache, return_cache=True, factorized_pos_emb=factorized
    )

    sync()
    t0 = time.perf_counter()
    logits, base = fwd(prompt, None)
    first = logits[:, -1:].argmax(-1)
    sync()
    res["prefill_s"] = time.perf_counter() - t0
    res["cache_type"] = "titans_pytorch tuple (seq_index, kv, NeuralMemState)"

    def run(n):
        cache, seq, steps, toks = copy.deepcopy(base), torch.cat([prompt, first], -1), [], []
        calls = 0
        for _ in range(n):
            sync()
            t = time.perf_counter()
            while True:  # long-term memory slots return no logits: their calls count towards the next token
                logits, cache = fwd(seq, cache)
                calls += 1
                if logits is not None:
                    break
            tok = logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, tok], -1)
            sync()
            steps.append(time.perf_counter() - t)
            toks.append(int(tok))
        res["forward_calls_last_repeat"] = calls
        return steps, toks

    return run


def task_decode(model, family, spec, task, emit):
    import torch

    C = task["context"]
    gen = torch.Generator().manual_seed(4321)
    prompt = torch.randint(0, spec["dims"]["vocab_size"], (1, C), generator=gen).to(spec["device"])
    model.eval()
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    res = {"kind": "decode", "model": spec["model"], "context": C, "batch": 1, "steps": task["steps"],
           "status": "running", "warmup_step_s": [], "repeat_step_s": [], "repeat_tokens_per_s": []}  # fmt: skip
    with _no_grad(spec), _amp(spec):
        res["inference_mode"] = torch.is_inference_mode_enabled()
        run = (_tp_decode if family == "tp" else _hf_decode)(model, spec, task, prompt, res, emit)
        emit(res)
        if task["warmup_steps"]:
            res["warmup_step_s"], _ = run(task["warmup_steps"])
        tokens = []
        for _ in range(task["repeats"]):
            steps, toks = run(task["steps"])
            res["repeat_step_s"].append(steps)
            res["repeat_tokens_per_s"].append(len(steps) / sum(steps))
            tokens.append(toks)
            res["peak_rss_bytes"] = _peak_rss_bytes()
            emit(res)
        res["tokens_head"] = tokens[0][:16]
        res["repeats_identical"] = all(t == tokens[0] for t in tokens)
        if family == "tp" and task.get("tp_sample_check"):
            # cross-check: the package's own sampler, greedy, with its cache (includes the prefill)
            t0 = time.perf_counter()
            sampled = model.sample(prompt, C + task["steps"] + 1, use_cache=True, temperature=0.0, show_progress=False)
            res["tp_sample_wall_s"] = time.perf_counter() - t0
            res["tp_sample_new_tokens"] = task["steps"] + 1
            res["tp_sample_tokens_match"] = sampled[0, 1:].tolist() == tokens[0]
    all_steps = [s for rep in res["repeat_step_s"] for s in rep]
    res.update(
        status="ok",
        tokens_per_s=statistics.median(res["repeat_tokens_per_s"]),  # N / (sum of N step times), median over repeats
        median_step_s=statistics.median(all_steps),
        tokens_per_s_from_median_step=1.0 / statistics.median(all_steps),
        peak_rss_bytes=_peak_rss_bytes(),
        **_gpu_mem(spec["device"]),
    )
    return res


def task_decode_interleaved(model, family, spec, task, emit):
    """Both contexts in one process, repeats alternating (short, long, short, long, ...): the long/short decode ratio
    then sees the same machine load, which separate processes minutes apart do not (shared machine)."""
    import torch

    gen = torch.Generator().manual_seed(4321)
    model.eval()
    contexts = task["contexts"]
    res = {"kind": "decode_interleaved", "model": spec["model"], "contexts": contexts, "steps": task["steps"],
           "status": "running", "prefill_s": {}, "repeat_tokens_per_s": {str(c): [] for c in contexts}}  # fmt: skip
    runs = {}
    with _no_grad(spec), _amp(spec):
        for C in contexts:
            prompt = torch.randint(0, spec["dims"]["vocab_size"], (1, C), generator=gen).to(spec["device"])
            sub = {}
            runs[C] = (_tp_decode if family == "tp" else _hf_decode)(model, spec, dict(task, warmup_steps=0), prompt, sub, emit)
            res["prefill_s"][str(C)] = sub["prefill_s"]
        for C in contexts:  # warm-up round
            runs[C](task["warmup_steps"] or 1)
        for _ in range(task["repeats"]):
            for C in contexts:
                steps, _ = runs[C](task["steps"])
                res["repeat_tokens_per_s"][str(C)].append(len(steps) / sum(steps))
            emit(res)
    med = {c: statistics.median(v) for c, v in res["repeat_tokens_per_s"].items()}
    lo, hi = str(min(contexts)), str(max(contexts))
    res.update(status="ok", tokens_per_s=med, ratio_long_short=med[hi] / med[lo],
               ratio_per_round=[a / b for a, b in zip(res["repeat_tokens_per_s"][hi], res["repeat_tokens_per_s"][lo])],
               peak_rss_bytes=_peak_rss_bytes())  # fmt: skip
    return res


def task_profile(model, family, spec, task, emit):
    """torch.profiler table of one training step at `length`, or of `steps` cached decode steps after a `context`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = spec["device"]
    gen = torch.Generator().manual_seed(1234)
    decode = task.get("context") is not None
    if decode:
        res = {}
        model.eval()
        prompt = torch.randint(0, spec["dims"]["vocab_size"], (1, task["context"]), generator=gen).to(device)
        sub = dict(steps=task["steps"], warmup_steps=0)
        with torch.no_grad():
            run = (_tp_decode if family == "tp" else _hf_decode)(model, spec, sub, prompt, res, emit)
            t0 = time.perf_counter()
            run(task["steps"])  # warm-up
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(task["steps"])
            wall = time.perf_counter() - t0
        what = dict(context=task["context"], steps=task["steps"], batch=1)
    else:
        L, batch = task["length"], task["batch"]
        x = torch.randint(0, spec["dims"]["vocab_size"], (batch, L + 1), generator=gen).to(device)
        model.train()

        def step():
            with _amp(spec):  # as the timed training steps (bf16 autocast with --dtype bfloat16)
                if family == "tp":
                    loss = model(x, return_loss=True)
                else:
                    loss = model(input_ids=x[:, :L], labels=x[:, :L], use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        step()  # warm-up
        warm = time.perf_counter() - t0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            step()
        wall = time.perf_counter() - t0
        what = dict(length=L, batch=batch)
    sort = "self_device_time_total" if (device.startswith("cuda") and not decode) else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=task["rows"])
    total_self = sum(e.self_cpu_time_total for e in averages) or 1.0
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[: task["rows"]]
    return {
        "kind": "profile", "model": spec["model"], "mode": "decode" if decode else "train", **what, "status": "ok",
        "warmup_s": warm, "profiled_wall_s": wall, "sort_by": sort, "table": table,
        "self_cpu_total_s": total_self / 1e6,
        "top_ops": [{"name": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "self_cpu_frac": e.self_cpu_time_total / total_self} for e in top],
        "peak_rss_bytes": _peak_rss_bytes(),
    }  # fmt: skip


TASKS = {"train": task_train, "decode": task_decode, "decode_interleaved": task_decode_interleaved,
         "profile": task_profile}


def worker_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    out_path = spec["out"]
    state = {"rss_after_import": None, "results": [], "params": None, "config": None}

    def emit(current=None):
        payload = dict(state)
        payload["results"] = state["results"] + ([current] if current is not None else [])
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, out_path)

    import torch

    torch.set_num_threads(spec["threads"])
    state["rss_after_import"] = _peak_rss_bytes()
    state["torch_threads"] = torch.get_num_threads()
    state["env"] = {k: os.environ[k] for k in ("TITANS_MEMORY_KERNEL", "TITANS_MALLOC_TRIM") if k in os.environ}
    emit()
    try:
        model, family, config = build_model(spec["model"], spec["dims"], spec["max_len"], spec["device"], spec["attn"],
                                            spec.get("code_dir"), spec.get("titans_attn"))
        if "modeling_titans" in sys.modules:
            state["modeling_titans_file"] = sys.modules["modeling_titans"].__file__
        state["params"], state["config"] = count_params(model, family), config
        state["attn_implementation"] = getattr(getattr(model, "config", None), "_attn_implementation", None)
        state["dtype"] = str(next(model.parameters()).dtype)
        state["rss_after_model"] = _peak_rss_bytes()
    except Exception as exc:  # noqa: BLE001
        state["error"] = f"{type(exc).__name__}: {exc}"
        state["traceback"] = traceback.format_exc()
        emit()
        return 2
    emit()
    for task in spec["tasks"]:
        try:
            res = TASKS[task["kind"]](model, family, spec, task, emit)
        except Exception as exc:  # noqa: BLE001  (OOM, numerical failure, ...: recorded, never fatal)
            text = f"{type(exc).__name__}: {exc}"
            oom = isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate" in text.lower()
            res = {k: v for k, v in task.items()}
            res.update(model=spec["model"], status="oom" if oom else "error", error=text[-2000:],
                       traceback=traceback.format_exc()[-4000:], peak_rss_bytes=_peak_rss_bytes())  # fmt: skip
        failures = memory_kernel_failures()
        if failures:  # the scan fell back to the PyTorch chunk loop: a slow figure that is not the kernels'
            res["memory_kernel_failures"] = failures
        state["results"].append(res)
        emit()
        if spec["device"].startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


# ================================================================================================================
# Parent side: plans the measurements, runs each in a subprocess with a watchdog, aggregates, plots, prints ratios.
# ================================================================================================================


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _vm_rss(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(args, model, tasks, dims, max_len, log):
    """Run `tasks` for `model` in a fresh subprocess. Returns (worker payload, child record)."""
    tmpdir = tempfile.mkdtemp(prefix="titans-bench-")
    spec_path, out_path, err_path = (os.path.join(tmpdir, n) for n in ("spec.json", "out.json", "stderr.txt"))
    spec = dict(model=model, tasks=tasks, dims=dims, max_len=max_len, device=args.device, threads=args.threads,
                attn=args.attn, out=out_path, code_dir=args.code_dir, dtype=args.dtype,
                titans_attn=args.titans_attn, inference_mode=args.inference_mode,
                torch_compile=args.torch_compile, torch_compile_mode=args.torch_compile_mode)  # fmt: skip
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **MODEL_ENV.get(model, {}))  # fmt: skip
    load_before = os.getloadavg()
    t0 = time.time()
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path], cwd=ROOT,
                                env=env, stdout=err, stderr=subprocess.STDOUT)  # fmt: skip
    status, max_vm_rss, loads = None, 0, []
    last_load = 0.0
    while True:
        rc = proc.poll()
        if rc is not None:
            break
        max_vm_rss = max(max_vm_rss, _vm_rss(proc.pid))
        elapsed = time.time() - t0
        if elapsed - last_load >= 10:
            loads.append(os.getloadavg()[0])
            last_load = elapsed
        if args.max_rss_gib and max_vm_rss > args.max_rss_gib * GIB:
            status = f"oom_guard (RSS {max_vm_rss / GIB:.1f} GiB > --max-rss-gib {args.max_rss_gib})"
        elif elapsed > args.timeout:
            status = f"timeout (> {args.timeout:.0f} s)"
        if status:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            rc = proc.returncode
            break
        time.sleep(0.25)
    wall = time.time() - t0
    payload = _read_json(out_path) or {"results": []}
    with open(err_path, errors="replace") as f:
        err_tail = f.read()[-3000:]
    if status is None and rc != 0:
        status = "killed (SIGKILL: likely the kernel OOM killer)" if rc == -9 else f"crashed (exit code {rc})"
    record = dict(model=model, tasks=len(tasks), wall_s=wall, returncode=rc, abnormal_exit=status,
                  load_before=list(load_before), load_after=list(os.getloadavg()), load_during=loads,
                  max_vm_rss_bytes=max_vm_rss)  # fmt: skip
    if status or rc != 0 or payload.get("error"):
        record["stderr_tail"] = err_tail
    # tasks the child did not finish: keep partial raw data, mark them
    results = payload.get("results", [])
    finished = [r for r in results if r.get("status") not in (None, "running")]
    partial = [r for r in results if r.get("status") == "running"]
    for i, task in enumerate(tasks):
        if i < len(finished):
            continue
        res = dict(partial[0]) if (partial and i == len(finished)) else {k: v for k, v in task.items()}
        res.update(model=model, status=status or ("error" if payload.get("error") else "not run"),
                   error=payload.get("error") or err_tail[-1500:])  # fmt: skip
        if max_vm_rss:
            res.setdefault("peak_rss_bytes", max_vm_rss)
        finished.append(res)
    for res in finished:
        res["load_before"], res["load_after"] = record["load_before"], record["load_after"]
        res["child_wall_s"] = wall
        res["rss_scope"] = "measurement" if len(tasks) == 1 else f"process shared by {len(tasks)} tasks of {model}"
        if res.get("peak_rss_bytes"):
            res["peak_rss_gib"] = res["peak_rss_bytes"] / GIB
    payload["results"] = finished
    import shutil

    shutil.rmtree(tmpdir, ignore_errors=True)
    log(f"  [{model}] {len(tasks)} task(s) in {wall:.0f} s, load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
        + (f", {status}" if status else ""))  # fmt: skip
    return payload, record


def machine_info(args) -> dict:
    import torch
    import transformers

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "threads": args.threads,
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = int(f.readline().split()[1]) / 1024**2
    except OSError:
        pass
    try:
        import titans_pytorch  # noqa: F401
        from importlib.metadata import version

        info["titans_pytorch"] = version("titans-pytorch")
    except Exception:  # noqa: BLE001
        info["titans_pytorch"] = None
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip()  # fmt: skip
    except Exception:  # noqa: BLE001
        pass
    return info


CODE_FILES = ("configuration_titans.py", "modeling_titans.py")


def snapshot_code(ref: str) -> tuple[str, dict]:
    """Copy the model code (at git `ref`, or the working tree for 'worktree') to a private folder that every child
    imports, so that edits to the repository during a long run cannot mix code versions between measurements."""
    import hashlib
    import shutil

    folder = tempfile.mkdtemp(prefix="titans-bench-code-")
    info = {"ref": ref, "files": {}}
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30)  # noqa: E731
    if ref != "worktree":
        commit = git("rev-parse", ref).stdout.strip()
        if not commit:
            raise SystemExit(f"--code-ref {ref!r}: not a git revision of {ROOT}")
        info["commit"] = commit
    for name in CODE_FILES:
        dest = os.path.join(folder, name)
        if ref == "worktree":
            shutil.copy(os.path.join(ROOT, name), dest)
        else:
            blob = subprocess.run(["git", "show", f"{info['commit']}:{name}"], cwd=ROOT, capture_output=True, timeout=30)
            if blob.returncode:
                raise SystemExit(f"git show {info['commit']}:{name} failed: {blob.stderr.decode()[-500:]}")
            with open(dest, "wb") as f:
                f.write(blob.stdout)
        with open(dest, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        with open(os.path.join(ROOT, name), "rb") as f:
            same = hashlib.sha256(f.read()).hexdigest() == digest
        info["files"][name] = {"sha256": digest, "same_as_worktree_at_start": same}
    return folder, info


def titans_pytorch_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("titans_pytorch") is not None
    except Exception:  # noqa: BLE001
        return False


_MEDIAN_OF = {"train": "tokens_per_s", "decode": "tokens_per_s", "decode_interleaved": "ratio_long_short"}


def median_rounds(data) -> None:
    """--rounds: one entry per point, the round whose figure (tokens/s; the long/short ratio for the alternating
    decode) is the median (the lower one for an even count), with every round's figure attached; all rounds' entries
    move to data["rounds"]."""
    data["rounds"] = {}
    for kind, field in _MEDIAN_OF.items():
        groups = {}
        for e in data[kind]:
            point = (e.get("model"), e.get("length"), e.get("context"), str(e.get("contexts")))
            groups.setdefault(point, []).append(e)
        data["rounds"][kind], merged = data[kind], []
        for entries in groups.values():
            ok = sorted((e for e in entries if e.get("status") == "ok"), key=lambda e: e[field])
            if not ok:
                merged.append(entries[0])
                continue
            chosen = dict(ok[(len(ok) - 1) // 2])
            chosen.update(rounds_ok=len(ok), rounds_total=len(entries),
                          rounds_values={field: [e[field] for e in sorted(ok, key=lambda e: e["round"])]})  # fmt: skip
            merged.append(chosen)
        data[kind] = merged


def _get(entries, model, key, value, field="tokens_per_s"):
    for e in entries:
        if e.get("model") == model and e.get(key) == value and e.get("status") == "ok":
            return e.get(field)
    return None


def summarize(data) -> dict:
    """Ratios and pass/fail against the issue's targets (only from what was measured)."""
    train, decode = data["train"], data["decode"]
    lengths = data["plan"]["lengths"]
    contexts = data["plan"]["decode_contexts"]
    models = data["plan"]["models"]
    titans = [m for m in models if m in TITANS_VARIANTS]
    short = 1024 if 1024 in lengths else min(lengths, default=None)
    mid = 4096 if 4096 in lengths else max(lengths, default=None)
    long_ = 8192 if 8192 in lengths else max(lengths, default=None)
    ctx_s, ctx_l = (min(contexts), max(contexts)) if contexts else (None, None)
    batch = data["plan"].get("batch", 4)
    bx = f"{batch}x"  # the rows name batch x length (the targets are at batch 4)
    cpu = data["plan"]["device"] == "cpu"  # the titans-pytorch, RSS and decode targets are CPU targets
    # ... at the anchor dimensions, where the anchor document measured titans-pytorch (batch 4 to train)
    anchor_cpu = cpu and data["plan"].get("dims", FULL_DIMS) == FULL_DIMS
    rows = []

    def add(group, name, value, target=None, ok=None, note="", flop_bound=None):
        rows.append(dict(group=group, name=name, value=value, target=target, passed=ok, note=note,
                         flop_bound=flop_bound))

    def bound(a, b, L):
        """--flops: the tok/s ratio a / b at equal FLOP/s, i.e. b's counted FLOPs per token over a's."""
        fa, fb = _get(train, a, "length", L, "flops_per_token"), _get(train, b, "length", L, "flops_per_token")
        return fb / fa if fa and fb else None

    # >= 5x at 1,024 and >= 10x at 4,096; a run at one length is judged against that length's target only
    vs_tp = {short: 5.0, **({mid: 10.0} if mid != short or mid == 4096 else {})}
    for m in titans if lengths and ("titans-pytorch" in models or cpu) else []:
        for L, need in vs_tp.items():
            mine, tp = _get(train, m, "length", L), _get(train, "titans-pytorch", "length", L)
            r = mine / tp if mine and tp else None
            add("train vs titans-pytorch", f"{m} / titans-pytorch tok/s @ {bx}{L}", r, f">= {need:g}",
                None if r is None else r >= need, flop_bound=bound(m, "titans-pytorch", L))
            anchor = ANCHOR_TP_TOKENS_PER_S.get(L) if anchor_cpu and batch == 4 else None
            if mine and anchor:
                add("train vs titans-pytorch", f"{m} / anchor-doc titans-pytorch ({anchor:g}) @ {bx}{L}", mine / anchor,
                    f">= {need:g}", mine / anchor >= need, "anchor-doc number, other run")
    for m in models if long_ != short else []:
        a, b = _get(train, m, "length", long_), _get(train, m, "length", short)
        r = a / b if a and b else None
        tgt = ">= 0.7" if m in TITANS_VARIANTS else None
        add("length scaling", f"{m} tok/s @{long_} / tok/s @{short}", r, tgt,
            None if (r is None or tgt is None) else r >= 0.7)
    for m in titans if lengths else []:
        a, b = _get(train, m, "length", short), _get(train, "swa", "length", short)
        r = a / b if a and b else None
        add("vs memory disabled", f"{m} / swa (memory_layers=[]) tok/s @ {bx}{short}", r, ">= 0.5",
            None if r is None else r >= 0.5, flop_bound=bound(m, "swa", short))
    for m in [m for m in models if m in NO_TRIM_MODELS] if lengths else []:  # TITANS_MALLOC_TRIM=0: no targets
        base = NO_TRIM_MODELS[m]
        for L in lengths:
            a, b, tp = (_get(train, x, "length", L) for x in (m, base, "titans-pytorch"))
            if a and b:
                add("heap trimming off", f"{m} / {base} tok/s @ {bx}{L}", a / b)
            if a and tp:
                add("heap trimming off", f"{m} / titans-pytorch tok/s @ {bx}{L}", a / tp)
    if data["plan"]["device"].startswith("cuda") and "llama" in models:
        gpu_targets = {4096: 0.7, 32768: 1.0}  # the GPU targets (Llama with FlashAttention/SDPA)
        for m in titans + (["swa"] if "swa" in models else []):
            for L in lengths:
                a, b = _get(train, m, "length", L), _get(train, "llama", "length", L)
                r = a / b if a and b else None
                need = gpu_targets.get(L) if m in TITANS_VARIANTS else None
                add("GPU train vs Llama", f"{m} / llama tok/s @ {bx}{L}", r,
                    None if need is None else f">= {need:g}", None if (r is None or need is None) else r >= need,
                    flop_bound=bound(m, "llama", L))
    for m in models if lengths else []:
        rss = _get(train, m, "length", mid, "peak_rss_bytes")
        gib = rss / GIB if rss else None
        tgt = "<= 3 GiB" if m in TITANS_VARIANTS and anchor_cpu else None  # a target at the anchor size
        add("peak memory", f"{m} peak RSS (GiB) @ {bx}{mid}", gib, tgt, None if (gib is None or tgt is None) else gib <= 3.0)
        gpu = _get(train, m, "length", mid, "peak_gpu_allocated_bytes")
        if gpu:
            add("peak memory", f"{m} peak GPU allocated (GiB) @ {bx}{mid}", gpu / GIB)
    if contexts:
        for m in titans:
            for C in contexts:
                a, b = _get(decode, m, "context", C), _get(decode, "titans-pytorch", "context", C)
                r = a / b if a and b else None
                add("decode", f"{m} / titans-pytorch cached decode tok/s, context {C}", r, ">= 4",
                    None if r is None else r >= 4.0)
            a = _get(decode, m, "context", ctx_s)
            if a and anchor_cpu:
                add("decode", f"{m} decode tok/s (ctx {ctx_s}) / anchor-doc titans-pytorch ({ANCHOR_TP_DECODE_TOKENS_PER_S})",
                    a / ANCHOR_TP_DECODE_TOKENS_PER_S, ">= 4", a / ANCHOR_TP_DECODE_TOKENS_PER_S >= 4.0,
                    "anchor-doc number (512-token prompt), other run")
        for m in models if ctx_l != ctx_s else []:
            a, b = _get(decode, m, "context", ctx_l), _get(decode, m, "context", ctx_s)
            r = a / b if a and b else None
            tgt = ">= 0.9" if m in TITANS_VARIANTS else None
            add("decode", f"{m} decode tok/s ctx {ctx_l} / ctx {ctx_s} (separate processes)", r, tgt,
                None if (r is None or tgt is None) else r >= 0.9)
            inter = next((e for e in data.get("decode_interleaved", [])
                          if e["model"] == m and e.get("status") == "ok"), None)  # fmt: skip
            if inter:
                r = inter["ratio_long_short"]
                add("decode", f"{m} decode tok/s ctx {ctx_l} / ctx {ctx_s} (one process, alternating)", r, tgt,
                    None if tgt is None else r >= 0.9)
    return {"rows": rows, "short_len": short, "mid_len": mid, "long_len": long_}


def format_tables(data) -> str:
    lines = []
    plan = data["plan"]
    gpu = plan["device"].startswith("cuda")
    mem = "peak GPU allocated GiB" if gpu else "peak RSS GiB"
    rounds = f", the round with the median of {plan['rounds']}" if plan.get("rounds", 1) > 1 else ""
    mode = f", mode={plan['torch_compile_mode']!r}" if plan.get("torch_compile_mode") else ""
    compiled = f", torch.compile(model, backend={plan['torch_compile']!r}{mode})" if plan.get("torch_compile") else ""
    lines.append(f"\nTraining (batch {plan['batch']}, {plan.get('dtype', 'float32')}{compiled}): tokens/s | {mem}   "
                 f"[median of timed steps{rounds}]")
    head = f"{'model':<15}{'params':>10}" + "".join(f"{L:>20}" for L in plan["lengths"])
    lines.append(head)
    for m in plan["models"]:
        p = data["models"].get(m, {}).get("params")
        cells = []
        for L in plan["lengths"]:
            e = next((e for e in data["train"] if e["model"] == m and e["length"] == L), None)
            if e is None:
                cells.append("-")
            elif e.get("status") == "ok":
                peak = e.get("peak_gpu_allocated_bytes", 0) if gpu else e["peak_rss_bytes"]
                cells.append(f"{e['tokens_per_s']:.0f} | {peak / GIB:.2f}")
            else:
                cells.append(str(e.get("status", "?")).split(" ")[0])
        lines.append(f"{m:<15}{(p or 0) / 1e6:>9.2f}M" + "".join(f"{c:>20}" for c in cells))
    if plan.get("flops") and plan["lengths"]:
        lines.append("\nTraining FLOPs (one step, matmuls and attention, torch.utils.flop_counter): "
                     "MFLOP per token | achieved GFLOP/s")
        lines.append(head)
        for m in plan["models"]:
            cells = []
            for L in plan["lengths"]:
                fields = ("flops_per_token", "achieved_flops_per_s")
                per_token, rate = (_get(data["train"], m, "length", L, f) for f in fields)
                cells.append(f"{per_token / 1e6:.2f} | {rate / 1e9:.1f}" if per_token else "-")
            lines.append(f"{m:<15}{'':>10}" + "".join(f"{c:>20}" for c in cells))
    if plan["decode_contexts"]:
        mode = ", torch.inference_mode" if plan.get("inference_mode") else ""
        mode += rounds
        lines.append(f"\nDecode (batch 1, greedy, cached, {plan['decode_steps']} steps{mode}): tokens/s | prefill s")
        lines.append(f"{'model':<15}" + "".join(f"{'ctx ' + str(C):>22}" for C in plan["decode_contexts"]))
        for m in plan["models"]:
            cells = []
            for C in plan["decode_contexts"]:
                e = next((e for e in data["decode"] if e["model"] == m and e["context"] == C), None)
                if e is None:
                    cells.append("-")
                elif e.get("status") == "ok":
                    cells.append(f"{e['tokens_per_s']:.1f} | {e['prefill_s']:.2f}")
                else:
                    cells.append(str(e.get("status", "?")).split(" ")[0])
            lines.append(f"{m:<15}" + "".join(f"{c:>22}" for c in cells))
    entries = data["train"] + data["decode"]
    for m, key in sorted({(e["model"], k) for e in entries for k in e.get("memory_kernel_failures", {})}):
        lines.append(f"WARNING {m}: the fused memory kernel failed for {key}; that scan ran the PyTorch chunk loop")
    lines.append("\nRatios and targets (issue 'Speed and memory')")
    for r in data["summary"]["rows"]:
        v = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        verdict = "" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL")
        tgt = r["target"] or ""
        note = f"  ({r['note']})" if r["note"] else ""
        if r.get("flop_bound") is not None:
            note = f"  [FLOP bound {r['flop_bound']:.3f}]" + note
        lines.append(f"  {r['name']:<72}{v:>9}  {tgt:<10}{verdict}{note}")
    if plan.get("flops"):
        lines.append("  FLOP bound: the ratio at equal FLOP/s (the other model's counted FLOPs per token over this one's)")
    if data["plan"].get("quick"):
        lines.append("  (--quick: tiny dims and lengths; the targets are meant for the full run)")
    return "\n".join(lines)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = data["plan"]
    show_train, show_decode = bool(plan["lengths"]), bool(plan["decode_contexts"])
    panels = 2 * show_train + show_decode or 1  # only the panels that have points (--no-train, --no-decode)
    fig, grid = plt.subplots(1, panels, figsize=(6 * panels, 5.2), squeeze=False)
    axes = [*(grid[0][:2] if show_train else [None, None]), grid[0][-1]]
    for m in plan["models"] if show_train else []:
        pts = [(e["length"], e["tokens_per_s"], e["peak_rss_bytes"] / GIB)
               for e in data["train"] if e["model"] == m and e.get("status") == "ok"]  # fmt: skip
        if not pts:
            continue
        pts.sort()
        style = "-o" if m in TITANS_VARIANTS else "--s"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=m)
        key = "peak_gpu_allocated_bytes" if plan["device"].startswith("cuda") else None
        if key:
            mem = [(e["length"], e[key] / GIB) for e in data["train"] if e["model"] == m and e.get("status") == "ok"]
            mem.sort()
            axes[1].plot([p[0] for p in mem], [p[1] for p in mem], style, label=m)
        else:
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=m)
    if show_train:
        for ax in axes[:2]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(plan["lengths"], [str(L) for L in plan["lengths"]])
            ax.set_xlabel(f"sequence length (batch {plan['batch']})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("training tokens/s (fwd+bwd)")
        axes[0].set_title("Training throughput")
        axes[1].set_ylabel("peak GPU memory (GiB)" if plan["device"].startswith("cuda") else "peak RSS (GiB)")
        axes[1].set_title("Peak memory (own process per point)")
    if show_decode:
        ctxs = plan["decode_contexts"]
        inter = {e["model"]: e for e in data.get("decode_interleaved", []) if e.get("status") == "ok"}
        series = [(f"context {C} (own process)", C, None) for C in ctxs]
        if inter:
            series += [(f"context {C} (alternating, one process)", C, "//") for C in sorted({min(ctxs), max(ctxs)})]
        width = 0.8 / len(series)
        for j, (label, C, hatch) in enumerate(series):
            if hatch:
                vals = [inter[m]["tokens_per_s"].get(str(C), 0.0) if m in inter else 0.0 for m in plan["models"]]
            else:
                vals = [_get(data["decode"], m, "context", C) or 0.0 for m in plan["models"]]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(plan["models"]))]
            axes[2].bar(xs, vals, width, label=label, hatch=hatch, color=f"C{ctxs.index(C) if C in ctxs else j}",
                        alpha=0.55 if hatch else 1.0)  # fmt: skip
        axes[2].set_xticks(range(len(plan["models"])), plan["models"], rotation=30)
        axes[2].set_yscale("log")
        axes[2].set_ylabel("decode tokens/s (batch 1, greedy, cached)")
        axes[2].set_title(f"Cached decoding, {plan['decode_steps']} steps after prefill")
        axes[2].legend(fontsize=7)
        axes[2].grid(alpha=0.3, axis="y")
    elif not show_train:
        axes[2].axis("off")
    info = data["meta"]
    fig.suptitle(f"Titans benchmark - {info.get('cpu_model') or info['device']}, torch threads={info['threads']}, "
                 f"torch {info['torch']}" + (" (--quick)" if plan.get("quick") else ""), fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot and reprint the tables of an existing JSON")
    p.add_argument("--output", default=os.path.join(ROOT, "results", "benchmark.json"), help="JSON path")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png); 'none' disables")
    p.add_argument("--quick", action="store_true", help="tiny dims and lengths, 1 warm-up + 2 steps (CI, seconds)")
    p.add_argument("--models", default=None, help=f"comma list from {','.join(ALL_MODELS + EXTRA_MODELS)} "
                   f"(default: all but {','.join(EXTRA_MODELS)})")
    p.add_argument("--with-titans-pytorch", action="store_true", help="include titans-pytorch in --quick")
    p.add_argument("--lengths", default=None, help="training sequence lengths (default 512,1024,2048,4096,8192)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per training point (default 1)")
    p.add_argument("--min-steps", type=int, default=None, help="minimum timed steps (default 3)")
    p.add_argument("--max-steps", type=int, default=None, help="maximum timed steps (default 5)")
    p.add_argument("--step-budget-s", type=float, default=60.0,
                   help="stop adding timed steps once they sum past this (after --min-steps)")
    p.add_argument("--slow-step-s", type=float, default=60.0,
                   help="a warm-up step slower than this caps the point to 1 warm-up + --capped-steps timed steps")
    p.add_argument("--capped-steps", type=int, default=2)
    p.add_argument("--tp-max-train-len", type=int, default=4096,
                   help="skip titans-pytorch training above this length (its RSS at 4x4096 is ~18 GiB)")
    p.add_argument("--decode-contexts", default=None, help="prefill lengths for decoding (default 128,8192)")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--no-train", action="store_true", help="decoding only (no training points)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed single-token steps per repeat (default 128)")
    p.add_argument("--decode-warmup", type=int, default=None, help="untimed warm-up decode steps (default 16)")
    p.add_argument("--decode-repeats", type=int, default=None, help="repeats from the same prefilled cache (default 3)")
    p.add_argument("--no-decode-interleaved", action="store_true",
                   help="skip the extra per-model process that alternates the shortest and longest decode context")
    p.add_argument("--no-tp-sample-check", action="store_true", help="skip timing titans-pytorch's own sample()")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the whole plan this many times, the model order reversed every other round, and "
                        "report per point the round with the median figure (this machine's speed drifts by tens of "
                        "percent between minutes; every round's figures stay in the JSON)")
    p.add_argument("--inference-mode", action="store_true",
                   help="decode under torch.inference_mode() instead of torch.no_grad() (every model, titans-pytorch "
                        "included)")
    p.add_argument("--torch-compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="train Titans and Llama through torch.compile(model, backend=BACKEND) (default inductor), as "
                        "Trainer's torch_compile=True does; the memory scan is one operator of the compiled graph. The "
                        "first warm-up step compiles")
    p.add_argument("--torch-compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="inductor's mode for --torch-compile (Trainer's torch_compile_mode): reduce-overhead replays "
                        "each step as CUDA graphs on a GPU, which needs the step to be one graph without host reads")
    p.add_argument("--flops", action="store_true",
                   help="also count the floating-point operations of one training step per point (matmuls and "
                        "attention, torch.utils.flop_counter, the memory's PyTorch scan), and report the achieved "
                        "FLOP/s and the FLOP bound of each throughput ratio")
    p.add_argument("--profile", action="append", default=[],
                   help="MODEL:LEN (one training step) or MODEL:decode:CTX (--profile-decode-steps cached decode steps "
                        "after a CTX-token prefill): a torch.profiler table, stored in the JSON; repeatable")
    p.add_argument("--profile-decode-steps", type=int, default=32)
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--isolation", choices=("measurement", "model"), default=None,
                   help="fresh process per measurement (default) or per model (default in --quick)")
    p.add_argument("--timeout", type=float, default=2400.0, help="seconds per child process")
    p.add_argument("--max-rss-gib", type=float, default=None,
                   help="kill a child above this RSS and record it as OOM (default: 90%% of RAM)")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in every child (default: the core count; 1 in --quick). On a machine "
                        "shared with other jobs use 1: a multi-threaded op waits for its slowest thread, so every op "
                        "can cost a scheduler time slice (measured here: 10-30x slower steps with 2 threads at load 6)")
    p.add_argument("--titans-attn", default=None,
                   help="attn_implementation for the Titans models only (e.g. flex_attention on GPU: block-sparse "
                        "sliding window), Llama keeps --attn")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="float32, or mixed precision: fp32 weights + torch.autocast to this dtype (as Trainer --bf16)")
    p.add_argument("--attn", default=None, help="attn_implementation for Titans/Llama (default sdpa; Llama flash on GPU)")
    p.add_argument("--code-ref", default="HEAD",
                   help="git revision of configuration_titans.py / modeling_titans.py to benchmark ('worktree' for the "
                        "files as they are); copied once at start so concurrent edits cannot leak into the run")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    dims = p.add_argument_group("model dimensions (default: the anchor configuration; --quick: tiny)")
    for key, value in FULL_DIMS.items():
        dims.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None, help=f"default {value}")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: expected a positive number of rounds")
    if args.torch_compile and args.flops:  # the count would run the compiled step, whose kernels it cannot see
        p.error("--flops counts the eager step: run it without --torch-compile")
    if args.torch_compile_mode and args.torch_compile != "inductor":  # (other backends ignore a mode silently)
        p.error(f"--torch-compile-mode is inductor's: use it with --torch-compile (inductor), not {args.torch_compile!r}")
    return args


def _cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10)
        return out.returncode == 0 and b"GPU" in out.stdout
    except Exception:  # noqa: BLE001
        return False


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.replot:
        with open(args.replot) as f:
            data = json.load(f)
        data["summary"] = summarize(data)
        path = args.plot or os.path.splitext(args.replot)[0] + ".png"
        plot(data, path)
        print(format_tables(data) + f"\nwrote {path}")
        return 0

    q = args.quick
    if args.threads is None:
        args.threads = 1 if q else os.cpu_count()
    dims = dict(QUICK_DIMS if q else FULL_DIMS)
    dims.update({k: getattr(args, k) for k in FULL_DIMS if getattr(args, k) is not None})
    lengths = [] if args.no_train else (_ints(args.lengths) if args.lengths else ([64, 128] if q else [512, 1024, 2048, 4096, 8192]))
    contexts = [] if args.no_decode else (_ints(args.decode_contexts) if args.decode_contexts else ([16, 64] if q else [128, 8192]))
    warmup = args.warmup if args.warmup is not None else 1
    min_steps = args.min_steps if args.min_steps is not None else (2 if q else 3)
    max_steps = args.max_steps if args.max_steps is not None else (2 if q else 5)
    decode_steps = args.decode_steps or (8 if q else 128)
    decode_warmup = args.decode_warmup if args.decode_warmup is not None else (2 if q else 16)
    decode_repeats = args.decode_repeats or (2 if q else 3)
    isolation = args.isolation or ("model" if q else "measurement")
    if args.max_rss_gib is None:
        try:
            with open("/proc/meminfo") as f:
                args.max_rss_gib = round(0.9 * int(f.readline().split()[1]) / 1024**2, 1)
        except OSError:
            args.max_rss_gib = 0
    tp_ok = titans_pytorch_available()
    args.code_dir, code_info = snapshot_code(args.code_ref)
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in models if m not in ALL_MODELS + EXTRA_MODELS]
        if bad:
            raise SystemExit(f"unknown model(s) {bad}; choose from {ALL_MODELS + EXTRA_MODELS}")
    else:
        models = [m for m in ALL_MODELS if m != "titans-pytorch" or ((not q) or args.with_titans_pytorch)]
    skipped_models = {}
    if "titans-pytorch" in models and not tp_ok:
        skipped_models["titans-pytorch"] = "titans_pytorch is not importable (pip install titans-pytorch==0.5.5)"
        models.remove("titans-pytorch")

    max_len = max(lengths + [c + max(decode_steps, decode_warmup) + 8 for c in contexts], default=0) + 64
    logf = sys.stdout

    def log(msg):
        print(msg, file=logf, flush=True)

    out_path = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    plot_path = None if (args.plot or "").lower() == "none" else (args.plot or os.path.splitext(out_path)[0] + ".png")

    data = {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable,
                                                       os.path.relpath(os.path.abspath(__file__), ROOT), *(argv if argv is not None else sys.argv[1:])]),  # fmt: skip
        "cwd": os.path.relpath(os.getcwd(), ROOT),  # relative to the repository: results stay portable
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "meta": machine_info(args),
        "note": args.note,
        "model_code": code_info,
        "plan": dict(models=models, lengths=lengths, batch=args.batch, decode_contexts=contexts, decode_steps=decode_steps,
                     decode_warmup=decode_warmup, decode_repeats=decode_repeats, warmup=warmup, min_steps=min_steps,
                     max_steps=max_steps, step_budget_s=args.step_budget_s, slow_step_s=args.slow_step_s,
                     capped_steps=args.capped_steps, isolation=isolation, device=args.device, quick=q, dims=dims,
                     tp_max_train_len=args.tp_max_train_len, timeout_s=args.timeout, max_rss_gib=args.max_rss_gib,
                     max_position_embeddings=max_len, dtype=args.dtype,
                     titans_attn=args.titans_attn, inference_mode=args.inference_mode, rounds=args.rounds, flops=args.flops,
                     memory_kernel=os.environ.get("TITANS_MEMORY_KERNEL", "auto"), torch_compile=args.torch_compile,
                     torch_compile_mode=args.torch_compile_mode,
                     # every TITANS_* setting the workers inherit (kernel block, precision, warps, heap trimming)
                     titans_environment={k: v for k, v in sorted(os.environ.items()) if k.startswith("TITANS_")}),  # fmt: skip
        "method": {
            "train": "tokens/s = batch*length / median(step), step = forward (loss on all positions) + backward, "
                     "zero_grad between steps, no optimiser step; random token ids (seed 1234); float32 weights, "
                     "bf16/fp16 autocast around the forward with --dtype",
            "decode": "batch 1, greedy (argmax), prefill the context with the cache, then `steps` single-token calls; "
                      "tokens/s = steps / sum(step times) per repeat (includes chunk-boundary memory updates and, for "
                      "titans-pytorch, its long-term-memory slot calls), median over repeats; each repeat starts from "
                      "a deep copy of the post-prefill cache",
            "peak_memory": "CPU: ru_maxrss of the child process (includes the Python/torch import, see "
                           "rss_after_import); GPU: torch.cuda.max_memory_allocated",
            "machine_load": "the machine was shared with other jobs during the run; os.getloadavg() before/after each "
                            "child is stored with every entry (load_before/load_after: 1, 5, 15-min averages)",
        },
        "skipped_models": skipped_models,
        "models": {},
        "train": [],
        "decode": [],
        "decode_interleaved": [],
        "profiles": [],
        "children": [],
    }

    def save():
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, out_path)

    def absorb(payload, record):
        data["children"].append(record)
        m = record["model"]
        info = data["models"].setdefault(m, {})
        for key in ("params", "config", "attn_implementation", "dtype", "rss_after_import", "rss_after_model",
                    "torch_threads", "modeling_titans_file", "env"):  # fmt: skip
            if payload.get(key) is not None and key not in info:
                info[key] = payload[key]
        if isinstance(info.get("params"), dict):
            info.update(info.pop("params"))
        for res in payload["results"]:
            kind = res.get("kind")
            if kind == "profile":
                data["profiles"].append(res)
            elif kind in ("train", "decode", "decode_interleaved"):
                data[kind].append(res)
        save()

    def train_task(m, L):
        return dict(kind="train", length=L, batch=args.batch, warmup=warmup, min_steps=min_steps, max_steps=max_steps,
                    step_budget_s=args.step_budget_s, slow_step_s=args.slow_step_s, capped_steps=args.capped_steps,
                    flops=args.flops)

    def decode_task(m, C):
        return dict(kind="decode", context=C, steps=decode_steps, warmup_steps=decode_warmup, repeats=decode_repeats,
                    tp_sample_check=not args.no_tp_sample_check)

    load = os.getloadavg()[0]
    if args.device == "cpu" and args.threads > 1 and load > (os.cpu_count() or 1) - 0.5:
        warning = (f"load average {load:.1f} on {os.cpu_count()} cores with --threads {args.threads}: other jobs share "
                   "the CPU, multi-threaded ops will stall on descheduled threads; consider --threads 1")
        data["meta"]["load_warning"] = warning
        log("WARNING: " + warning)
    log(f"benchmark: models={models} lengths={lengths} batch={args.batch} decode contexts={contexts} "
        f"device={args.device} threads={args.threads} isolation={isolation}")  # fmt: skip
    t_start = time.time()
    order = [(r, m) for r in range(args.rounds) for m in (models if r % 2 == 0 else models[::-1])]
    for i, (round_index, m) in enumerate(order):
        if args.rounds > 1 and (i == 0 or order[i - 1][0] != round_index):
            log(f"round {round_index + 1} of {args.rounds}")
        tasks = []
        for L in lengths:
            if m == "titans-pytorch" and L > args.tp_max_train_len:
                data["train"].append(dict(kind="train", model=m, length=L, batch=args.batch, status="skipped",
                                          round=round_index,
                                          note=f"titans-pytorch is skipped above {args.tp_max_train_len} tokens "
                                               "(anchor doc: peak RSS 18 GiB at 4x4096)"))  # fmt: skip
                continue
            tasks.append(train_task(m, L))
        tasks += [decode_task(m, C) for C in contexts]
        if len(contexts) >= 2 and not args.no_decode_interleaved:
            tasks.append(dict(kind="decode_interleaved", contexts=[min(contexts), max(contexts)], steps=decode_steps,
                              warmup_steps=decode_warmup, repeats=decode_repeats + 1))
        groups = [tasks] if isolation == "model" else [[t] for t in tasks]
        for group in groups:
            what = ", ".join(f"{t['kind']}@{t.get('length', t.get('context', t.get('contexts')))}" for t in group)
            log(f"- {m}: {what}")
            payload, record = run_child(args, m, group, dims, max_len, log)
            for res in payload["results"]:
                res["round"] = round_index
            absorb(payload, record)
            for res in payload["results"]:
                if res.get("status") == "ok" and res["kind"] == "train":
                    flops = (f", {res['flops'] / 1e9:.1f} GFLOP/step at {res['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"
                             if "flops" in res else "")
                    log(f"    train {res['length']}: {res['tokens_per_s']:.0f} tok/s, step {res['median_step_s']:.2f} s "
                        f"(steps {', '.join(f'{s:.2f}' for s in res['steps_s'])}), RSS {res['peak_rss_gib']:.2f} GiB{flops}")
                elif res.get("status") == "ok" and res["kind"] == "decode":
                    log(f"    decode ctx {res['context']}: {res['tokens_per_s']:.1f} tok/s, prefill {res['prefill_s']:.2f} s, "
                        f"RSS {res['peak_rss_gib']:.2f} GiB")
                elif res.get("status") == "ok" and res["kind"] == "decode_interleaved":
                    log(f"    decode interleaved {res['contexts']}: "
                        + ", ".join(f"ctx {c} {v:.1f}" for c, v in res["tokens_per_s"].items())
                        + f" tok/s, long/short {res['ratio_long_short']:.3f}")
                elif res.get("status") != "ok":
                    log(f"    {res.get('kind')} {res.get('length', res.get('context', res.get('contexts')))}: {res.get('status')} "
                        f"{str(res.get('error', ''))[-300:]}")
    for spec_text in args.profile:
        parts = spec_text.split(":")
        m = parts[0]
        if len(parts) == 3 and parts[1] == "decode":
            task = dict(kind="profile", context=int(parts[2]), steps=args.profile_decode_steps, rows=args.profile_rows)
            need = int(parts[2]) + 2 * args.profile_decode_steps + 64
        elif len(parts) == 2:
            task = dict(kind="profile", length=int(parts[1]), batch=args.batch, rows=args.profile_rows)
            need = int(parts[1]) + 64
        else:
            raise SystemExit(f"--profile {spec_text!r}: expected MODEL:LEN or MODEL:decode:CTX")
        log(f"- profile {spec_text}")
        payload, record = run_child(args, m, [task], dims, max(max_len, need), log)
        absorb(payload, record)
        prof = data["profiles"][-1] if data["profiles"] else None
        if prof and prof.get("table"):
            log(f"profile {spec_text} (batch {prof.get('batch')}): wall {prof['profiled_wall_s']:.2f} s\n{prof['table']}")
    data["total_wall_s"] = time.time() - t_start
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.rounds > 1:
        median_rounds(data)
    data["summary"] = summarize(data)
    save()
    if plot_path:
        try:
            plot(data, plot_path)
            data["plot"] = os.path.relpath(plot_path, ROOT) if plot_path.startswith(ROOT) else plot_path
        except Exception as exc:  # noqa: BLE001
            data["plot_error"] = f"{type(exc).__name__}: {exc}"
        save()
    import shutil

    shutil.rmtree(args.code_dir, ignore_errors=True)
    log(format_tables(data))
    log(f"\nwrote {out_path}" + (f" and {plot_path}" if data.get("plot") else "") + f" ({data['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
