"""Evaluation scripts: the memory-task generators (answers really lie beyond the window, labels only on answers),
`eval_memory.py --quick` end to end, `visualize_memory.py` and `eval_ppl.py` on tiny saved models."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config


SCRIPTS = os.path.join(ROOT, "scripts")


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"titans_{name}_script", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


em = load_script("eval_memory")


def run(script, args, tmp_path, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"))  # fmt: skip
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------------------------
# task generators
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("haystack", em.HAYSTACKS)
@pytest.mark.parametrize("window", [8, 16])
def test_passkey_answer_beyond_window(window, haystack):
    for ratio in (1, 2, 4, 8):
        d = ratio * window
        seq_len = em.passkey_length(8 * window)
        batch = em.passkey_batch(64, d, seq_len, seed=ratio, haystack_kind=haystack)
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == labels.shape == (64, seq_len)
        assert ids.min() >= 0 and ids.max() < em.VOCAB_SIZE
        for r in range(64):
            ks, q = batch["key_start"][r], batch["query_pos"][r]
            key = ids[r, ks : ks + 4]
            assert ids[r, ks - 1] == em.KEY_MARK and np.isin(key, em.DIGITS).all()
            # labels: exactly the 4 answer tokens after the question's KEY, equal to the key
            answer_pos = np.flatnonzero(labels[r] != em.IGNORE)
            assert answer_pos.tolist() == list(range(q + 1, q + 5))
            assert (labels[r, answer_pos] == key).all() and (ids[r, answer_pos] == key).all()
            # the first position that predicts an answer (q) is more than a window after the last key digit,
            # and the key appears nowhere else in the input before the answers
            assert q - (ks + 3) == d + 2 > window
            assert not np.isin(ids[r, ks + 4 : q + 1], em.DIGITS).any()
            assert not np.isin(ids[r, 1 : ks - 1], em.DIGITS).any()


def test_passkey_is_a_pure_function_of_the_seed():
    a = em.passkey_batch(8, 32, 80, seed=3)
    b = em.passkey_batch(8, 32, 80, seed=3)
    c = em.passkey_batch(8, 32, 80, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    with pytest.raises(ValueError):
        em.passkey_batch(2, 100, 50, seed=0)


@pytest.mark.parametrize("num_facts", [1, 4, 16, 32])
def test_mqar_keys_before_the_window(num_facts):
    window, layers = 16, 2
    gap = layers * window
    batch = em.mqar_batch(32, num_facts, gap, seed=num_facts)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (32, 1 + 4 * num_facts + gap) and ids.max() < em.VOCAB_SIZE
    for r in range(32):
        facts = {ids[r, 1 + 2 * i]: ids[r, 2 + 2 * i] for i in range(num_facts)}
        assert len(facts) == num_facts and np.isin(list(facts), em.MQAR_KEYS).all()
        answer_pos = np.flatnonzero(labels[r] != em.IGNORE)
        assert len(answer_pos) == num_facts  # one label per query, on the value
        assert (answer_pos == batch["query_pos"][r] + 1).all()
        for a, pair_pos in zip(answer_pos, batch["pair_pos"][r]):
            query_key = ids[r, a - 1]
            assert labels[r, a] == facts[query_key] == ids[r, pair_pos]
            assert ids[r, pair_pos - 1] == query_key
            # the fact is out of reach of every sliding window, even stacked over all layers
            assert (a - 1) - pair_pos > layers * window
        # the query key appears once before: in its fact
        assert sorted(ids[r, answer_pos - 1].tolist()) == sorted(facts)
        assert not np.isin(ids[r, 1 + 2 * num_facts : 1 + 2 * num_facts + gap], em.MQAR_KEYS).any()


def test_train_batches_follow_the_curriculum():
    args = em.parse_args(["--quick"])
    first = em.passkey_train_batch(args, 0, 100, seed=0)
    last = em.passkey_train_batch(args, 99, 100, seed=1)
    assert first["input_ids"].shape[1] < last["input_ids"].shape[1]
    assert ((first["query_pos"] - first["key_start"] - 4) >= args.window).all()  # always beyond the window
    facts = {em.mqar_train_batch(args, 0, 100, seed=s)["labels"].__ne__(em.IGNORE).sum(1)[0] for s in range(5)}
    assert facts == {min(args.facts)}


def test_model_zoo_builds_equal_width_models():
    args = em.parse_args(["--quick"])
    for name in em.MODELS + em.EXTRA_MODELS:
        model = em.build_model(name, args, seed=0)
        assert model.config.hidden_size == args.hidden_size and model.config.num_hidden_layers == args.layers
        if name == "swa":
            assert model.config.memory_layers == []
        if name == "no_momentum":
            assert model.config.memory_use_momentum is False
        if name == "no_forgetting":
            assert model.config.memory_use_forgetting is False
        if name == "linear_memory":
            assert model.config.memory_depth == 1
        if name == "mac_sliding":
            assert model.config.variant == "mac" and model.config.mac_attention == "sliding"


def test_accuracy_counts_only_answers():
    class Oracle(torch.nn.Module):  # predicts each next token perfectly
        def forward(self, input_ids, use_cache=False):
            logits = torch.full((*input_ids.shape, em.VOCAB_SIZE), -1e4)
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 0.0)
            return type("Out", (), {"logits": logits})

    batch = em.mqar_batch(8, 4, 32, seed=0)
    assert em.answer_accuracy(Oracle(), batch) == (1.0, 1.0)
    batch["input_ids"][:, 3:10] = em.FILLER[0]  # damage non-answer positions only: still perfect
    assert em.answer_accuracy(Oracle(), {**batch}) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# scripts end to end
# ---------------------------------------------------------------------------------------------------------------


def test_eval_memory_quick(tmp_path):
    out = tmp_path / "eval_memory.json"
    passkey_models = ["mag", "swa", "llama", "no_momentum", "mac_sliding"]  # (an extra model, asked for by name)
    run("eval_memory.py", ["--quick", "--output", str(out), "--passkey_models", *passkey_models], tmp_path, timeout=90)
    results = json.loads(out.read_text())
    assert (tmp_path / "eval_memory.png").stat().st_size > 1000
    assert list(results["tasks"]["passkey"]["models"]) == ["mag", "swa", "llama", "no_momentum", "mac_sliding"]
    for task, key in (("passkey", "exact_match"), ("mqar", "accuracy")):
        models = results["tasks"][task]["models"]
        assert {"mag", "swa", "llama", "no_momentum"} <= set(models)
        for res in models.values():
            assert res["steps"] > 0 and all(0 <= r[key] <= 1 for r in res["eval"].values())


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """Tiny MAG and MAC Titans with the repository tokenizer, saved with save_pretrained."""
    from transformers import AutoTokenizer

    sys.path.insert(0, ROOT)
    from modeling_titans import TitansForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT, trust_remote_code=True)
    paths = {}
    for variant in ("mag", "mac"):
        config = tiny_config(variant, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"tiny_{variant}")
        TitansForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[variant] = str(path)
    return paths


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_visualize_memory(tiny_saved, tmp_path, variant):
    out = tmp_path / "viz.png"
    traces = tmp_path / "viz.json"
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 3
    run("visualize_memory.py", [tiny_saved[variant], "--text", text, "--max_tokens", "60", "--output", str(out),
                                "--json", str(traces)], tmp_path)  # fmt: skip
    assert out.stat().st_size > 1000
    data = json.loads(traces.read_text())
    T = len(data["tokens"])
    assert set(data["layers"]) == {"0", "1"}
    for layer in data["layers"].values():
        for key in ("surprise", "theta", "eta", "alpha", "weight_norm", "retrieval_norm"):
            arr = np.asarray(layer[key])
            assert arr.shape == (2, T) and np.isfinite(arr).all(), key
        assert (np.asarray(layer["theta"]) > 0).all() and (np.asarray(layer["alpha"]) < 1).all()


def test_surprise_norm_matches_autograd():
    viz = load_script("visualize_memory")
    sys.path.insert(0, ROOT)
    gen = torch.Generator().manual_seed(0)
    for depth in (1, 2):
        dims = [8] + [16] * (depth - 1) + [8]
        weights = tuple(torch.randn(1, 2, dims[i + 1], dims[i], generator=gen, dtype=torch.float64) * 0.4
                        for i in range(depth))  # fmt: skip
        k = torch.nn.functional.normalize(torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64), dim=-1)
        v = torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64)
        fast = viz.surprise_norm(weights, k, v, "silu")
        from modeling_titans import memory_apply

        for h in range(2):
            for t in range(5):
                w = tuple(x.clone().requires_grad_(True) for x in weights)
                loss = (memory_apply(w, k[:, :, t : t + 1], "silu")[0, h] - v[0, h, t]).pow(2).sum()
                grads = torch.autograd.grad(loss, w)
                expected = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                torch.testing.assert_close(fast[0, h, t], expected)


def test_eval_ppl_tiny(tiny_saved, tmp_path):
    corpus = tmp_path / "code.txt"
    corpus.write_text("\n".join(f"def add_{i}(x):\n    return x + {i}\n\n\nclass Item{i}:\n    value = {i * 7}\n"
                                for i in range(150)))  # fmt: skip
    out = tmp_path / "ppl.json"
    run("eval_ppl.py", [tiny_saved["mag"], "--train_files", str(corpus), "--block_size", "32", "--context_lengths",
                        "16", "32", "64", "--llama_steps", "3", "--validation_split_percentage", "20",
                        "--max_eval_tokens", "640", "--output", str(out)], tmp_path)  # fmt: skip
    results = json.loads(out.read_text())
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    assert set(results["models"]) == {"model", "llama"}
    assert results["models"]["llama"]["steps"] == 3
    for block in results["models"].values():
        assert [r["context"] for r in block["perplexity"]] == [16, 32, 64]
        # the same held-out tokens at every context length
        assert len({r["windows"] * r["context"] for r in block["perplexity"]}) == 1
        assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in block["perplexity"])
