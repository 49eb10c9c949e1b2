"""Hub readiness: remote code loads where the project is not importable, a Hub-cache layout loads offline by repo
id, scripts/push_to_hub.py stages exactly the repository files, dtype and sharding survive, bad weights fail cleanly.

Nothing here touches the network: Hub loads use HF_HUB_OFFLINE=1 on a locally laid-out cache and uploads are mocked.
"""

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, VARIANTS, assert_reloaded_logits, tiny_model

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline


ROOT = Path(ROOT)
SCRIPT = ROOT / "scripts" / "push_to_hub.py"
TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five\n"
REPO_ID = "titans-org/tiny-titans"
REVISION = "0123456789abcdef0123456789abcdef01234567"
CORE_FILES = {"config.json", "generation_config.json", "configuration_titans.py", "modeling_titans.py", "README.md"}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location("push_to_hub_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env(hf_home: Path) -> dict:
    """Environment of a child that sees neither the project (PYTHONPATH) nor the user's Hub cache nor the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


# Run first in every isolated child: drop whatever makes the repository importable (the editable install's
# meta-path finder from its .pth, a plain .pth path entry, the repository root), then prove it is gone.
BOOTSTRAP = textwrap.dedent(
    """
    import importlib, os, sys
    _repo = os.path.realpath(os.environ["TITANS_REPO_ROOT"])
    def _editable(obj):
        return "__editable__" in (getattr(obj, "__module__", None) or "") or "__editable__" in repr(obj)
    sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p and os.path.realpath(p or os.getcwd()) != _repo]
    for _name in [n for n in sys.modules if n.startswith("__editable__")]:
        del sys.modules[_name]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    for _name in ("modeling_titans", "configuration_titans"):
        try:
            importlib.import_module(_name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"ISOLATION FAILED: {_name} importable from {sys.modules[_name].__file__}")
    """
)


def run_isolated(body: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -I` in a scratch working directory, project scrubbed from the import system, offline Hub."""
    work = tmp / "elsewhere"
    work.mkdir(exist_ok=True)
    script = work / "child.py"
    script.write_text(BOOTSTRAP + textwrap.dedent(body))
    env = clean_env(tmp / "hf_home")
    env["TITANS_REPO_ROOT"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-I", str(script), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"child failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@torch.no_grad()
def logits_and_greedy(model, ids, new_tokens=8):
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask).logits
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    return logits, tokens


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The repository's tokenizer when it exists, else a tiny byte-level BPE built here."""
    if all((ROOT / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return ROOT
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT * 3, (ROOT / "scripts" / "push_to_hub.py").read_text()], trainer=trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
    ).save_pretrained(out)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A random-parameter tiny model whose vocabulary fits the tokenizer, saved with its tokenizer."""
    model = tiny_model("mag", vocab_size=max(64, len(tokenizer)))
    folder = tmp_path_factory.mktemp("saved") / "tiny-titans"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, saved):
    """scripts/push_to_hub.py --dry-run, run as the CLI a user types."""
    folder, _ = saved
    tmp = tmp_path_factory.mktemp("dry")
    out = tmp / "hub-folder"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(folder), "--dry-run", str(out)],
        cwd=ROOT, env=clean_env(tmp / "hf_home"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "nothing uploaded" in proc.stdout
    return out


def tokenizer_files(tokenizer, tmp: Path) -> set[str]:
    return {Path(f).name for f in tokenizer.save_pretrained(tmp / "tokenizer-only")}


# ---------------------------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------------------------


def test_model_card_parses_with_required_metadata_and_sections():
    from huggingface_hub import ModelCard

    card = ModelCard.load(ROOT / "model_card.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert {"titans", "test-time-memory", "custom_code"} <= set(meta["tags"])
    assert meta["datasets"] and meta["language"]
    text = card.text
    for heading in (
        "## What Titans is", "## How to use", "## Variants", "## Training data", "## Evaluation results",
        "## Limitations", "## Interpretation choices", "## Citation",
    ):  # fmt: skip
        assert re.search(rf"^{re.escape(heading)}\s*$", text, re.M), heading
    assert "trust_remote_code=True" in text and "TitansCache" in text and "generate(" in text
    assert all(f"**{v}**" in text for v in ("MAC", "MAG", "MAL", "LMM"))
    assert "results/*.json" in text and "scripts/eval_*.py" in text
    assert "2501.00663" in text and "Behrouz, Ali and Zhong, Peilin and Mirrokni, Vahab" in text
    assert "Titans: Learning to Memorize at Test Time" in text


# ---------------------------------------------------------------------------------------------------------------
# remote code, loaded where the project is not importable
# ---------------------------------------------------------------------------------------------------------------


def test_remote_code_loads_in_isolated_process_with_identical_outputs(tmp_path):
    ids = torch.randint(2, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    expected = {}
    for variant in VARIANTS:
        model = tiny_model(variant, seed=3)
        model.save_pretrained(tmp_path / "models" / variant)
        with torch.no_grad():
            expected[variant] = (*logits_and_greedy(model, ids), model.model(ids).last_hidden_state)
    torch.save({"ids": ids, "threads": torch.get_num_threads()}, tmp_path / "inputs.pt")

    run_isolated(
        """
        import sys, torch
        from transformers import AutoModel, AutoModelForCausalLM
        models, variants = sys.argv[1], sys.argv[2].split(",")
        inputs = torch.load(sys.argv[3])
        torch.set_num_threads(inputs["threads"])
        ids, mask, out = inputs["ids"], torch.ones_like(inputs["ids"]), {}
        for variant in variants:
            model = AutoModelForCausalLM.from_pretrained(f"{models}/{variant}", trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            assert "modeling_titans" not in sys.modules and "configuration_titans" not in sys.modules
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
                tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            base = AutoModel.from_pretrained(f"{models}/{variant}", trust_remote_code=True)  # the base model, no head
            assert type(base).__name__ == "TitansModel", type(base).__name__
            with torch.no_grad():
                hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
            out[variant] = (type(model).__module__, logits, tokens, hidden)
        torch.save(out, sys.argv[4])
        """,
        tmp_path, str(tmp_path / "models"), ",".join(VARIANTS), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"),
    )  # fmt: skip
    got = torch.load(tmp_path / "out.pt")
    for variant in VARIANTS:
        module, logits, tokens, hidden = got[variant]
        assert module.startswith("transformers_modules.") and module.endswith(".modeling_titans")
        assert_reloaded_logits(logits, expected[variant][0])
        torch.testing.assert_close(hidden, expected[variant][2], atol=1e-5, rtol=1e-4)
        assert torch.equal(tokens, expected[variant][1]), variant
        assert tokens.shape[1] == ids.shape[1] + 8


def test_pull_by_repo_id_from_offline_hub_cache(tmp_path, dry_run, saved, tokenizer):
    """The staged folder laid out as the Hub cache (HF_HOME/hub/models--org--name/...) loads by repo id, offline."""
    _, model = saved
    org, name = REPO_ID.split("/")
    repo_cache = tmp_path / "hf_home" / "hub" / f"models--{org}--{name}"
    shutil.copytree(dry_run, repo_cache / "snapshots" / REVISION)
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(REVISION)

    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    expected = logits_and_greedy(model, ids)
    run_isolated(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        repo_id, text, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
        torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        ids = tokenizer(text, return_tensors="pt").input_ids
        assert tokenizer.decode(ids[0]) == text
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            tokens = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
            )
        torch.save({"module": type(model).__module__, "ids": ids, "logits": logits, "tokens": tokens}, sys.argv[4])
        """,
        tmp_path, REPO_ID, TEXT, str(torch.get_num_threads()), str(tmp_path / "out.pt"),
    )  # fmt: skip
    got = torch.load(tmp_path / "out.pt")
    assert got["module"].startswith("transformers_modules.") and REVISION in got["module"]  # the cached snapshot
    assert torch.equal(got["ids"], ids)
    assert_reloaded_logits(got["logits"], expected[0])
    assert torch.equal(got["tokens"], expected[1])


# ---------------------------------------------------------------------------------------------------------------
# scripts/push_to_hub.py
# ---------------------------------------------------------------------------------------------------------------


def test_dry_run_folder_has_exactly_the_repository_files(dry_run, tokenizer, tmp_path):
    expected = CORE_FILES | {"model.safetensors"} | tokenizer_files(tokenizer, tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= expected
    assert {p.name for p in dry_run.iterdir()} == expected
    assert all(p.is_file() for p in dry_run.iterdir())
    config = json.loads((dry_run / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_titans.TitansConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_titans.TitansForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_titans.TitansModel"
    assert (dry_run / "README.md").read_text() == (ROOT / "model_card.md").read_text()


def test_dry_run_round_trips_with_identical_logits(dry_run, saved, tokenizer):
    _, model = saved
    loaded = AutoModelForCausalLM.from_pretrained(dry_run, trust_remote_code=True)
    assert type(loaded).__module__.startswith("transformers_modules.")
    assert loaded.dtype == model.dtype
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert_reloaded_logits(loaded(ids).logits, model(ids).logits)


def test_verify_refuses_a_staged_model_with_other_weights(dry_run, saved, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    _, model = saved
    staged = tmp_path / "staged"
    shutil.copytree(dry_run, staged)
    weights = load_file(staged / "model.safetensors")
    name = next(n for n in weights if n.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] * 1.01  # a 1 % change of one matrix: far above float noise
    save_file(weights, staged / "model.safetensors", metadata={"format": "pt"})
    verify = load_script().verify
    verify(model, tokenizer, dry_run)  # the untouched folder passes
    with pytest.raises(RuntimeError, match="different logits"):
        verify(model, tokenizer, staged)


def test_tokenizer_from_dry_run_folder(dry_run, tokenizer):
    loaded = AutoTokenizer.from_pretrained(dry_run, trust_remote_code=True)
    assert len(loaded) == len(tokenizer)
    ids = loaded(TEXT).input_ids
    assert ids == tokenizer(TEXT).input_ids
    assert loaded.decode(ids) == TEXT  # byte-level: exact round trip
    assert loaded.eos_token == tokenizer.eos_token and loaded.pad_token == tokenizer.pad_token


def test_text_generation_pipeline_from_dry_run_folder(dry_run, saved):
    _, model = saved
    pipe = pipeline("text-generation", model=str(dry_run), trust_remote_code=True)
    assert type(pipe.model).__module__.startswith("transformers_modules.")
    prompt = "def add(a, b):"
    out = pipe(prompt, max_new_tokens=8, do_sample=False)
    text = out[0]["generated_text"]
    assert isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt)
    ids = pipe.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert text == pipe.tokenizer.decode(reference[0], skip_special_tokens=True)


def test_max_shard_size_writes_shards_and_keeps_bf16(tmp_path, tokenizer):
    folder = tmp_path / "bf16-model"
    model = tiny_model("mac", seed=5, vocab_size=max(64, len(tokenizer))).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = load_script().main([str(folder), "--max_shard_size", "50KB", "--dry-run", str(tmp_path / "staged")])

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    assert {p.name for p in out.iterdir()} == (
        CORE_FILES | shards | {"model.safetensors.index.json"} | tokenizer_files(tokenizer, tmp_path)
    )
    from safetensors import safe_open

    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert loaded.dtype == torch.bfloat16
    state, reference = loaded.state_dict(), model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    # compare with the unsharded folder loaded the same way: `model.to(bfloat16)` also rounds the non-persistent
    # rotary inv_freq buffer, which from_pretrained rebuilds in float32 (as for Llama)
    source = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, source(ids).logits)


def test_push_uploads_the_staged_folder(tmp_path, saved, dry_run, monkeypatch):
    """Without --dry-run the same folder goes to HfApi.upload_folder (mocked: no network)."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            files = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}
            calls.append(("upload_folder", kwargs, files))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder, _ = saved
    argv = [str(folder), "--repo_id", REPO_ID, "--private", "--revision", "v0.1", "--token", "hf_fake"]
    assert load_script().main(argv) == REPO_ID
    (_, token), (_, repo, create), (_, branch_repo, branch), (_, upload, files) = calls
    assert token == "hf_fake" and repo == branch_repo == REPO_ID
    assert create["private"] is True and create["exist_ok"] is True
    assert branch == {"branch": "v0.1", "exist_ok": True}
    assert upload["repo_id"] == REPO_ID and upload["revision"] == "v0.1"
    assert set(files) == {p.name for p in dry_run.iterdir()}
    assert files["README.md"] == (dry_run / "README.md").read_bytes()
    assert files["model.safetensors"] == (dry_run / "model.safetensors").read_bytes()


def test_push_script_refuses_bad_inputs(tmp_path, saved, capsys):
    folder, _ = saved
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args([str(folder)])
    assert "--repo_id is required" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "leftover.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        script.main([str(folder), "--dry-run", str(busy)])
    small = tmp_path / "small-vocab"
    tiny_model("lmm").save_pretrained(small)  # vocab 64: too small for the tokenizer
    with pytest.raises(SystemExit, match="vocab_size"):
        script.main([str(small), "--tokenizer", str(folder), "--dry-run", str(tmp_path / "never")])


# ---------------------------------------------------------------------------------------------------------------
# dtype and damaged weights
# ---------------------------------------------------------------------------------------------------------------


def test_bf16_save_and_load_keeps_dtype_and_weights(tmp_path):
    model = tiny_model("mal").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", trust_remote_code=True)
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    reference = model.state_dict()
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_damaged_safetensors_give_a_clear_error_not_a_crash(tmp_path):
    source = tmp_path / "good"
    tiny_model("mag").save_pretrained(source)
    data = (source / "model.safetensors").read_bytes()
    damaged = {
        "truncated_half": data[: len(data) // 2],
        "truncated_in_header": data[:20],
        "empty": b"",
        "garbage": torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes(),
        "garbage_header_json": struct.pack("<Q", 64) + b"{not json at all" + bytes(range(48)) + data[72:],
    }
    for name, payload in damaged.items():
        shutil.copytree(source, tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(payload)
    child = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoModelForCausalLM
        result = {}
        for folder in sys.argv[1:]:
            try:
                AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
                result[folder] = None
            except Exception as e:
                result[folder] = [type(e).__module__ + "." + type(e).__name__, str(e)]
        print("RESULT" + json.dumps(result))
        """
    )
    folders = [str(tmp_path / name) for name in damaged]
    proc = subprocess.run(
        [sys.executable, "-c", child, *folders],
        cwd=tmp_path, env=clean_env(tmp_path / "hf_home"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # a negative return code is a signal (a segfault is -11): the loader must raise, not crash
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for folder in folders:
        assert result[folder] is not None, f"{folder}: damaged weights loaded without an error"
        kind, message = result[folder]
        assert re.search(r"safetensors|header|model\.safetensors", message, re.I), (folder, kind, message)


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_resized_embeddings_stay_tied_and_survive_a_device_map_reload(variant, tmp_path):
    """Adding tokens before fine-tuning (`resize_token_embeddings`): the old tokens' logits do not move, the output
    head stays tied to the input embedding, the new ids are accepted (and the id range check follows the new size),
    and the resized model reloads through accelerate's `device_map="auto"` with the same logits."""
    model = tiny_model(variant)
    old = model.config.vocab_size
    ids = torch.randint(2, old, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
        model.resize_token_embeddings(old + 5)
        after = model(ids).logits
    assert model.config.vocab_size == old + 5 and after.shape[-1] == old + 5
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(after[..., :old], before, atol=1e-6, rtol=0)
    with_new = torch.cat([ids, torch.full((2, 1), old + 4)], dim=1)
    out = model.generate(with_new, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 16)
    with pytest.raises(ValueError, match=f"token id {old + 5}"):
        model(torch.tensor([[3, old + 5]]))
    model.save_pretrained(tmp_path / "resized")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resized", trust_remote_code=True, device_map="auto")
    assert loaded.config.vocab_size == old + 5
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert_reloaded_logits(loaded(with_new).logits, model(with_new).logits)
