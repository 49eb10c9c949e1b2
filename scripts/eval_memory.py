# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Synthetic long-range memory tasks beyond the attention window (design spec §5): passkey retrieval and
multi-query associative recall (MQAR).

For each task the script trains small models of one size from scratch on the task distribution (loss on the answer
tokens only) and reports held-out accuracy vs the key-query distance (passkey) and vs the number of facts (MQAR):

- the four Titans variants (`mac`, `mag`, `mal`, `lmm`);
- the memory-disabled Titans (`memory_layers=[]`: sliding-window attention only, same window) — "swa";
- a full-attention `LlamaForCausalLM` of the same width, depth, heads and MLP — "llama";
- ablations of the base variant: η = 0 (`memory_use_momentum=False`), α = 0 (`memory_use_forgetting=False`),
  L_M = 1 (`memory_depth=1`, linear memory).

Every answer lies beyond the window: the nearest key token is more than `window` tokens before the first position
that predicts an answer (in MQAR more than `num_hidden_layers * window` tokens, so that stacking sliding-window
layers cannot reach it either). Output: a JSON file and a PNG.

    .venv/bin/python scripts/eval_memory.py --output results/eval_memory.json          # full run (~35 min, 2 CPUs)
    .venv/bin/python scripts/eval_memory.py --quick --output /tmp/eval_memory.json      # CI smoke run (< 60 s)
"""

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads are very slow on a shared box

import numpy as np  # noqa: E402
import torch  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configuration_titans import TitansConfig  # noqa: E402
from modeling_titans import TitansForCausalLM  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary (256 ids)
# ----------------------------------------------------------------------------------------------------------------

VOCAB_SIZE = 256
PAD, BOS, KEY_MARK, QUESTION = 0, 1, 2, 3
DIGITS = np.arange(10, 20)  # passkey symbols
FILLER = np.arange(32, 96)  # haystack / gap tokens
MQAR_KEYS = np.arange(96, 128)
MQAR_VALUES = np.arange(128, 160)
IGNORE = -100
# the "noise" haystack of RULER / classic passkey: one fixed sentence repeated ("The grass is green. The sky is
# blue. ..."); here 12 fixed filler tokens, repeated from a random phase
NOISE_SENTENCE = np.random.default_rng(1234).choice(FILLER, size=12, replace=False)
HAYSTACKS = ("repeat", "random")


def haystack(rng: np.random.Generator, batch_size: int, length: int, kind: str = "repeat") -> np.ndarray:
    """(B, length) filler tokens: the noise sentence repeated from a random phase per row, or i.i.d. random tokens."""
    if kind == "repeat":
        phase = rng.integers(0, len(NOISE_SENTENCE), size=(batch_size, 1))
        return NOISE_SENTENCE[(phase + np.arange(length)[None]) % len(NOISE_SENTENCE)]
    if kind == "random":
        return rng.choice(FILLER, size=(batch_size, length))
    raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# Task generators: pure functions of (arguments, seed)
# ----------------------------------------------------------------------------------------------------------------


def passkey_length(distance: int, key_len: int = 4, prefix: int = 4) -> int:
    """Shortest sequence that holds a passkey example with this distance."""
    return 1 + prefix + 1 + key_len + distance + 2 + key_len


def passkey_batch(
    batch_size: int, distances, seq_len: int, seed: int, key_len: int = 4, haystack_kind: str = "repeat"
) -> dict:
    """Passkey retrieval, one example per row:

        BOS  filler…  KEY k_1 … k_L  filler × d  QUESTION KEY  a_1 … a_L

    The answer a = k (L digits). `distances` (int or one per row) is d, the number of filler tokens between the last
    key digit and QUESTION: the last key digit lies d + 2 tokens before the KEY of the question, the first position
    whose next-token prediction is an answer. Labels are the answer tokens, -100 elsewhere (the model shifts them).
    The filler before the key pads every row to `seq_len`, so the key sits at a random depth in the haystack.
    `haystack_kind`: "repeat" (a noise sentence repeated, as in RULER's niah_single_1) or "random" tokens.

    Returns numpy arrays: input_ids, labels (B, seq_len); key_start, query_pos (B,) where query_pos is the position
    of the question's KEY and the answers are query_pos+1 … query_pos+L.
    """
    rng = np.random.default_rng(seed)
    d = np.broadcast_to(np.asarray(distances, dtype=np.int64), (batch_size,))
    if seq_len < passkey_length(int(d.max()), key_len, prefix=0):
        raise ValueError(f"seq_len {seq_len} is too short for distance {int(d.max())}")
    ids = haystack(rng, batch_size, seq_len, haystack_kind)
    labels = np.full((batch_size, seq_len), IGNORE, dtype=np.int64)
    ids[:, 0] = BOS
    key = rng.choice(DIGITS, size=(batch_size, key_len))
    query_pos = np.full(batch_size, seq_len - key_len - 1)
    key_start = query_pos - 1 - d - key_len  # position of the first key digit
    rows = np.arange(batch_size)
    ids[rows, key_start - 1] = KEY_MARK
    for j in range(key_len):
        ids[rows, key_start + j] = key[:, j]
        ids[rows, query_pos + 1 + j] = key[:, j]
        labels[rows, query_pos + 1 + j] = key[:, j]
    ids[rows, query_pos - 1] = QUESTION
    ids[rows, query_pos] = KEY_MARK
    return {"input_ids": ids, "labels": labels, "key_start": key_start, "query_pos": query_pos, "key": key}


def mqar_batch(batch_size: int, num_facts: int, gap: int, seed: int, haystack_kind: str = "repeat") -> dict:
    """Multi-query associative recall (Zoology MQAR) with every query beyond the window:

        BOS  k_1 v_1 … k_n v_n  filler × gap  k_π1 v_π1 … k_πn v_πn

    Keys and values are drawn without replacement from 32 keys / 32 values, every key is queried once in a random
    order, and the label of a query key is its value (the loss/accuracy is on the n query values only). A query
    key is at least gap + 2 tokens after the value it asks for. Returns numpy arrays input_ids, labels (B, T) and
    pair_pos, query_pos (B, n): the position of each fact's value and of the query key that asks for it.
    """
    if num_facts > min(len(MQAR_KEYS), len(MQAR_VALUES)):
        raise ValueError(f"at most {min(len(MQAR_KEYS), len(MQAR_VALUES))} facts")
    rng = np.random.default_rng(seed)
    seq_len = 1 + 4 * num_facts + gap
    ids = np.empty((batch_size, seq_len), dtype=np.int64)
    labels = np.full((batch_size, seq_len), IGNORE, dtype=np.int64)
    ids[:, 0] = BOS
    keys = np.stack([rng.choice(MQAR_KEYS, num_facts, replace=False) for _ in range(batch_size)])
    values = np.stack([rng.choice(MQAR_VALUES, num_facts, replace=False) for _ in range(batch_size)])
    order = np.argsort(rng.random((batch_size, num_facts)), axis=1)
    ids[:, 1 : 1 + 2 * num_facts : 2] = keys
    ids[:, 2 : 2 + 2 * num_facts : 2] = values
    ids[:, 1 + 2 * num_facts : 1 + 2 * num_facts + gap] = haystack(rng, batch_size, gap, haystack_kind)
    start = 1 + 2 * num_facts + gap
    rows = np.arange(batch_size)[:, None]
    ids[:, start::2] = keys[rows, order]
    ids[:, start + 1 :: 2] = values[rows, order]
    labels[:, start + 1 :: 2] = values[rows, order]
    pair_pos = 2 + 2 * order  # value position of the fact each query asks for
    query_pos = start + 2 * np.arange(num_facts)[None].repeat(batch_size, 0)
    return {"input_ids": ids, "labels": labels, "pair_pos": pair_pos, "query_pos": query_pos}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

BASE_VARIANT = "lmm"  # default base of the ablations: the paper ablates LMM (Tab. 5); --base_variant changes it
ABLATIONS = {
    "no_momentum": dict(memory_use_momentum=False),
    "no_forgetting": dict(memory_use_forgetting=False),
    "linear_memory": dict(memory_depth=1),
}
MODELS = ["mac", "mag", "mal", "lmm", "swa", "llama", *ABLATIONS]
EXTRA_MODELS = ["mac_sliding"]  # asked for by name only: MAC with mac_attention="sliding" (model card D20)


def model_overrides(name: str, base: str = BASE_VARIANT) -> dict | None:
    """TitansConfig fields of a model of the zoo (None: the Llama baseline)."""
    if name == "llama":
        return None
    if name == "swa":  # every layer is sliding-window attention (the variant field is then unused)
        return dict(variant="mag", memory_layers=[])
    if name in ABLATIONS:
        return dict(variant=base, **ABLATIONS[name])
    if name == "mac_sliding":
        return dict(variant="mac", mac_attention="sliding")
    return dict(variant=name)


def model_label(name: str, base: str = BASE_VARIANT) -> str:
    fixed = {"mac": "Titans MAC", "mag": "Titans MAG", "mal": "Titans MAL", "lmm": "Titans LMM",
             "swa": "memory disabled (SWA only)", "llama": "Llama (full attention)",
             "mac_sliding": "Titans MAC, sliding attention"}  # fmt: skip
    what = {"no_momentum": "η=0 (no momentum)", "no_forgetting": "α=0 (no forgetting)",
            "linear_memory": "L_M=1 (linear memory)"}  # fmt: skip
    return fixed.get(name) or f"{base.upper()} {what[name]}"


def model_size(args) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip


def build_model(name: str, args, seed: int):
    torch.manual_seed(seed)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**model_size(args), max_position_embeddings=4096, attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    overrides = model_overrides(name, getattr(args, "base_variant", BASE_VARIANT))
    config = TitansConfig(
        **model_size(args),
        attention_window=args.window,
        num_persistent_tokens=args.persistent,
        num_memory_heads=args.memory_heads,
        memory_head_dim=args.memory_head_dim,
        memory_chunk_size=args.chunk,
        memory_max_lr=args.memory_max_lr,
        memory_depth=overrides.pop("memory_depth", args.memory_depth),
        attn_implementation="sdpa",
        **overrides,
    )
    return TitansForCausalLM(config)


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def passkey_train_batch(args, step: int, steps: int, seed: int) -> dict:
    """Curriculum: the largest distance grows from 1x to `train_max_ratio` x window over the first half."""
    w = args.window
    top = args.train_max_ratio * w
    frac = min(1.0, step / max(1, args.curriculum * steps))
    d_max = int(w + frac * (top - w))
    rng = np.random.default_rng(seed)
    d = rng.integers(w, d_max + 1, size=args.batch_size)
    return passkey_batch(args.batch_size, d, passkey_length(d_max), seed, haystack_kind=args.haystack)


def mqar_train_batch(args, step: int, steps: int, seed: int) -> dict:
    """Curriculum: the number of facts is drawn from the sizes unlocked so far (all of them after the first half)."""
    sizes = sorted(args.facts)
    frac = min(1.0, step / max(1, args.curriculum * steps))
    unlocked = sizes[: max(1, math.ceil(frac * len(sizes)))]
    rng = np.random.default_rng(seed)
    n = int(rng.choice(unlocked))
    return mqar_batch(args.batch_size, n, args.gap, seed, haystack_kind=args.haystack)


def to_torch(batch: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(batch[k])) for k in ("input_ids", "labels")}


def train(model, make_batch, steps: int, args, seed: int, log_prefix: str = "") -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, int(0.05 * steps))

    def lr_at(step):  # linear warmup, cosine decay to 10%
        return args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / steps))))

    model.train()
    start, losses, skipped = time.time(), [], 0
    for step in range(steps):
        batch = to_torch(make_batch(args, step, steps, seed * 1_000_003 + step))
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        if not torch.isfinite(loss):  # the inner memory state blew up on this batch: skip it
            skipped += 1
            if skipped > max(10, steps // 10):
                print(f"{log_prefix} step {step}: {skipped} non-finite losses, stopping", flush=True)
                break
            continue
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(norm):
            skipped += 1
            continue
        opt.step()
        losses.append(loss.item())
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"{log_prefix} step {step + 1}/{steps} loss {np.mean(losses[-args.log_every:]):.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)  # fmt: skip
    model.eval()
    return {"steps": len(losses), "skipped_steps": skipped, "seconds": round(time.time() - start, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else float("nan")}


@torch.no_grad()
def answer_accuracy(model, batch: dict, eval_batch: int = 64) -> tuple[float, float]:
    """(token accuracy, exact-match accuracy) of the argmax predictions on the answer tokens. Teacher forcing:
    exact match over a row's answers equals greedy decoding of the answer (each greedy step would see the same
    prefix), per-token accuracy gives partial credit."""
    ids, labels = batch["input_ids"], batch["labels"]
    correct_tok, total_tok, correct_row = 0, 0, 0
    for s in range(0, len(ids), eval_batch):
        x = torch.from_numpy(np.ascontiguousarray(ids[s : s + eval_batch]))
        y = torch.from_numpy(np.ascontiguousarray(labels[s : s + eval_batch]))
        logits = model(input_ids=x, use_cache=False).logits
        pred = logits[:, :-1].argmax(-1)
        target = y[:, 1:]
        mask = target != IGNORE
        hit = (pred == target) & mask
        correct_tok += int(hit.sum())
        total_tok += int(mask.sum())
        correct_row += int((hit | ~mask).all(1).sum())
    return correct_tok / total_tok, correct_row / len(ids)


def evaluate_passkey(model, args) -> dict:
    out = {}
    for ratio in args.ratios:
        d = int(ratio * args.window)
        batch = passkey_batch(args.eval_samples, d, passkey_length(max(d, args.window * max(args.ratios))),
                              seed=10_000_000 + d, haystack_kind=args.haystack)  # fmt: skip
        tok, exact = answer_accuracy(model, batch)
        out[str(ratio)] = {"distance": d, "token_accuracy": tok, "exact_match": exact}
    return out


def evaluate_mqar(model, args) -> dict:
    out = {}
    for n in args.facts:
        batch = mqar_batch(args.eval_samples, n, args.gap, seed=20_000_000 + n, haystack_kind=args.haystack)
        tok, exact = answer_accuracy(model, batch)
        out[str(n)] = {"num_facts": n, "accuracy": tok, "all_correct": exact}
    return out


TASKS = {
    "passkey": (passkey_train_batch, evaluate_passkey),
    "mqar": (mqar_train_batch, evaluate_mqar),
}


def plot(results: dict, path: str):
    """One row per task: variants and baselines (left), ablations (right). Passkey: per-digit accuracy (exact match
    of all 4 digits is in the JSON); a model whose inner memory diverged in training is marked in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("passkey", "mqar") if t in results["tasks"]]
    base = results["config"].get("base_variant", BASE_VARIANT)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(13, 4.4 * len(tasks)), squeeze=False)
    styles = {"swa": ("k", "--"), "llama": ("grey", ":")}
    for t, task in enumerate(tasks):
        block = results["tasks"][task]
        metric = "token_accuracy" if task == "passkey" else "accuracy"
        for panel, names in enumerate((
            [n for n in block["models"] if n in ("mac", "mag", "mal", "lmm", "swa", "llama", *EXTRA_MODELS)],
            [n for n in block["models"] if n in (base, *ABLATIONS, "swa")],
        )):  # fmt: skip
            ax = axes[t, panel]
            keys = []
            for name in names:
                res = block["models"][name]
                keys = list(res["eval"])
                label = model_label(name, base)
                planned = results["config"].get(f"{task}_steps") or results["config"]["steps"]
                if res.get("skipped_steps") and res["steps"] + res["skipped_steps"] < planned:
                    label += f" [memory diverged: stopped after {res['steps']} steps]"
                elif res.get("skipped_steps"):
                    label += f" [{res['skipped_steps']} non-finite batch(es) skipped]"
                color, ls = styles.get(name, (None, "-"))
                ax.plot([float(k) for k in keys], [100 * res["eval"][k][metric] for k in keys], marker="o",
                        color=color, linestyle=ls, label=label)  # fmt: skip
            if keys:
                ax.set_xscale("log", base=2)
                ax.set_xticks([float(k) for k in keys])
                ax.set_xticklabels(keys)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
            if task == "passkey":
                ax.set_xlabel(f"key → query distance / window (window = {results['config']['window']})")
                ax.set_ylabel("passkey per-digit accuracy (%)")
                ax.axhline(100 / len(DIGITS), color="r", lw=0.8, alpha=0.5)
            else:
                ax.set_xlabel(f"number of facts (every query ≥ {results['config']['gap'] + 1} tokens after its fact)")
                ax.set_ylabel("MQAR answer accuracy (%)")
                ax.axhline(100 * block["chance"], color="r", lw=0.8, alpha=0.5)
            steps = results["config"].get(f"{task}_steps") or results["config"]["steps"]
            ax.set_title(f"{task}, {steps} training steps: "
                         f"{'variants and baselines' if panel == 0 else 'ablations of ' + base.upper()}", fontsize=10)
            ax.legend(fontsize=7, loc="upper right")
    cfg = results["config"]
    fig.suptitle(f"Beyond-window memory tasks: hidden {cfg['hidden_size']}, {cfg['layers']} layers, window "
                 f"{cfg['window']}, memory chunk {cfg['chunk']}, max θ {cfg['memory_max_lr']}; red line: chance")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=os.path.join(ROOT, "results", "eval_memory.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny models, a few steps, < 60 s")
    p.add_argument("--tasks", nargs="+", default=["passkey", "mqar"], choices=list(TASKS))
    p.add_argument("--models", nargs="+", default=None,
                   help=f"subset of {list(MODELS)} (default: all), or also {EXTRA_MODELS} by name")
    p.add_argument("--passkey_models", nargs="+", default=None, help="models for passkey (default: --models)")
    p.add_argument("--mqar_models", nargs="+", default=None, help="models for MQAR (default: --models)")
    p.add_argument("--base_variant", default=BASE_VARIANT, choices=["mac", "mag", "mal", "lmm"],
                   help="variant whose switches the ablations flip")
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--persistent", type=int, default=4)
    p.add_argument("--memory_heads", type=int, default=4)
    p.add_argument("--memory_head_dim", type=int, default=16)
    p.add_argument("--memory_depth", type=int, default=2)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--memory_max_lr", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=400, help="training steps per model and task")
    p.add_argument("--passkey_steps", type=int, default=None)
    p.add_argument("--mqar_steps", type=int, default=None)
    p.add_argument("--curriculum", type=float, default=0.5, help="fraction of the steps over which tasks get harder")
    p.add_argument("--ratios", type=float, nargs="+", default=[1, 2, 4, 8], help="passkey distances / window")
    p.add_argument("--train_max_ratio", type=float, default=9.0, help="largest passkey distance in training / window")
    p.add_argument("--facts", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--gap", type=int, default=None, help="MQAR filler gap (default: layers * window)")
    p.add_argument("--haystack", default="repeat", choices=HAYSTACKS, help="filler: repeated noise sentence or random")
    p.add_argument("--eval_samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--joint", action=argparse.BooleanOptionalAction, default=False,
                   help="train one model per architecture on both tasks (alternating batches); --no-joint: one per task")
    p.add_argument("--merge", nargs="+", default=None, help="only combine these result JSONs (parallel runs) and plot")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: no OpenMP spin-waiting)")
    p.add_argument("--jobs", type=int, default=1, help="train this many models at once, in worker processes")
    p.add_argument("--log_every", type=int, default=50)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden_size, args.heads, args.window, args.memory_heads, args.memory_head_dim = 32, 2, 8, 2, 8
        args.chunk, args.steps, args.batch_size, args.eval_samples = 4, 6, 8, 16
        args.ratios, args.facts, args.log_every = [1, 4], [2, 4], 0
        args.train_max_ratio = 4.0
        if args.models is None:
            args.models = ["mag", "swa", "llama", "no_momentum"]
    if args.gap is None:
        args.gap = args.layers * args.window
    args.models = args.models or list(MODELS)
    args.passkey_models = args.passkey_models or args.models
    args.mqar_models = args.mqar_models or args.models
    for name in {*args.passkey_models, *args.mqar_models}:
        if name not in MODELS + EXTRA_MODELS:
            p.error(f"unknown model {name!r}; choose from {MODELS + EXTRA_MODELS}")
    args.plot = args.plot or os.path.splitext(args.output)[0] + ".png"
    return args


def joint_train_batch(args, step: int, steps: int, seed: int) -> dict:
    """Both tasks, alternating step by step, each with its own curriculum over the whole run. Passkey retrieval and
    MQAR need the same mechanism (store "previous token -> token" associations, read them with the current token),
    so one model per architecture learns both in the steps that two would need."""
    task = args.tasks[step % len(args.tasks)]
    return TASKS[task][0](args, step, steps, seed)


def task_block(results: dict, task: str) -> dict:
    block = results["tasks"].setdefault(task, {"models": {}})
    block["chance"] = 1 / len(DIGITS) ** 4 if task == "passkey" else 1 / len(MQAR_VALUES)
    block["metric"] = "exact match of the 4 key digits" if task == "passkey" else "accuracy over query answers"
    return block


def merge(paths: list[str]) -> dict:
    """Combine result files of runs with the same settings and different --models (parallel processes)."""
    merged = None
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        if merged is None:
            merged = part
            continue
        for task, block in part["tasks"].items():
            merged["tasks"].setdefault(task, block)["models"].update(block["models"])
        merged["total_seconds"] = max(merged.get("total_seconds", 0), part.get("total_seconds", 0))
    return merged


def run_job(job):
    """Train and evaluate one model on one task (in a worker process when --jobs > 1)."""
    args, task, name, t0 = job
    if args.threads:
        torch.set_num_threads(args.threads)
    make_batch, evaluate = TASKS[task]
    steps = getattr(args, f"{task}_steps") or args.steps
    model = build_model(name, args, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{task}] {name}: {n_params} parameters, {steps} steps", flush=True)
    info = train(model, make_batch, steps, args, args.seed, log_prefix=f"[{task}] {name}")
    info["parameters"] = n_params
    info["eval"] = evaluate(model, args)
    print(f"[{task}] {name}: {json.dumps(info['eval'])}  ({time.time() - t0:.0f}s total)", flush=True)
    return task, name, info


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        results = merge(args.merge)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
        plot(results, args.plot)
        print(f"wrote {args.output} and {args.plot}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("output", "plot", "merge", "jobs", "threads", "log_every")}
    results = {"config": config, "tasks": {}}
    if os.path.exists(args.output) and not args.quick:
        with open(args.output) as f:
            previous = json.load(f)
        if previous.get("config") == config:  # resume: keep the models already done
            results = previous
    t0 = time.time()

    def save():
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)

    if args.joint:  # one model per architecture, trained on both tasks, evaluated on each
        names = list(dict.fromkeys(args.passkey_models + args.mqar_models))
        for name in names:
            if all(name in task_block(results, task)["models"] for task in args.tasks):
                continue
            model = build_model(name, args, args.seed)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"[joint] {name}: {n_params} parameters, {args.steps} steps", flush=True)
            info = train(model, joint_train_batch, args.steps, args, args.seed, log_prefix=f"[joint] {name}")
            info["parameters"] = n_params
            for task in args.tasks:
                res = dict(info, eval=TASKS[task][1](model, args))
                task_block(results, task)["models"][name] = res
                print(f"[{task}] {name}: {json.dumps(res['eval'])}  ({time.time() - t0:.0f}s total)", flush=True)
            save()
    else:
        jobs = [(task, name) for task in args.tasks for name in getattr(args, f"{task}_models")
                if name not in task_block(results, task)["models"]]  # fmt: skip
        # the slowest models first, so that parallel workers finish together
        cost = {"mac": 5, "mac_sliding": 5, "mag": 4, "mal": 4, "no_momentum": 3, "no_forgetting": 3, "lmm": 3,
                "linear_memory": 2}  # fmt: skip
        jobs.sort(key=lambda job: -cost.get(job[1], 0))
        if args.jobs > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(args.jobs, len(jobs)), maxtasksperchild=1) as pool:
                for task, name, info in pool.imap_unordered(run_job, [(args, task, name, t0) for task, name in jobs]):
                    task_block(results, task)["models"][name] = info
                    save()
        else:
            for job in jobs:
                task, name, info = run_job((args, *job, t0))
                task_block(results, task)["models"][name] = info
                save()
        for task in args.tasks:  # a fixed model order in the file, whatever order the workers finished in
            block = task_block(results, task)
            block["models"] = {n: block["models"][n] for n in MODELS + EXTRA_MODELS if n in block["models"]}
    results["total_seconds"] = round(time.time() - t0, 1)
    save()
    plot(results, args.plot)
    print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
