# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Perplexity of a saved causal LM on held-out text at several context lengths, side by side with a same-size
full-attention `LlamaForCausalLM` trained with the same budget.

The held-out text is the validation split that `scripts/train.py` uses: the same data source (the Python standard
library sources by default, or --train_files / --validation_files), tokenised and packed into `--block_size` blocks,
and the last `--validation_split_percentage` % of them when there is no validation file. That token stream is cut
into non-overlapping windows of each context length L (the same tokens for every L: the stream is truncated to a
multiple of the largest L), and the perplexity is exp(mean next-token loss) over all of them. Longer windows give
the later tokens more context, so a model that uses long context gets a lower perplexity as L grows.

The Llama baseline: width, depth, heads, MLP, vocabulary and tied embeddings copied from the model's config, full
causal attention (RoPE), trained here on the training blocks with the saved model's step count, batch size, learning
rate, warmup and weight decay (read from its `trainer_state.json` / `training_args.bin`, overridable by flags), or
loaded from --llama_path.

    .venv/bin/python scripts/eval_ppl.py outputs/quickstart --output results/eval_ppl.json
"""

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
from data import load_raw_datasets, split_validation, tokenize_and_pack  # noqa: E402


def training_budget(model_path: str) -> dict:
    """Steps, batch size, learning rate, warmup and weight decay of the run that produced `model_path`."""
    budget = {}
    state = os.path.join(model_path, "trainer_state.json")
    if os.path.exists(state):
        with open(state) as f:
            st = json.load(f)
        budget["steps"] = st.get("global_step")
        budget["batch_size"] = st.get("train_batch_size")
    args_file = os.path.join(model_path, "training_args.bin")
    if os.path.exists(args_file):
        try:
            targs = torch.load(args_file, weights_only=False)
            budget.update(
                learning_rate=targs.learning_rate, weight_decay=targs.weight_decay, warmup_steps=targs.warmup_steps,
                batch_size=budget.get("batch_size") or targs.per_device_train_batch_size,
                lr_scheduler_type=str(getattr(targs.lr_scheduler_type, "value", targs.lr_scheduler_type)),
                seed=targs.seed,
            )  # fmt: skip
        except Exception as err:  # an unpicklable file from another version: fall back to the flags
            print(f"could not read {args_file}: {err}")
    return {k: v for k, v in budget.items() if v is not None}


def llama_like(config, max_positions: int):
    """A full-attention LlamaForCausalLM with the sizes of a Titans (or any Llama-like) config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None), rope_theta=getattr(config, "rope_theta", 10000.0),
        rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6), max_position_embeddings=max_positions,
        tie_word_embeddings=getattr(config, "tie_word_embeddings", True), pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(llama_config)


def train_llama(model, train_blocks: np.ndarray, budget: dict, log_every: int = 25) -> dict:
    """Plain AdamW loop with linear warmup and cosine decay to 0 (Trainer's default "cosine"), grad clip 1."""
    steps, batch_size = budget["steps"], budget["batch_size"]
    lr, wd, warmup = budget["learning_rate"], budget["weight_decay"], budget["warmup_steps"]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def schedule(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = np.random.default_rng(budget.get("seed", 0))
    model.train()
    start, losses = time.time(), []
    for step in range(steps):
        idx = rng.integers(0, len(train_blocks), size=batch_size)
        x = torch.from_numpy(train_blocks[idx])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"[llama] step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.3f} ({time.time() - start:.0f}s)",
                  flush=True)  # fmt: skip
    model.eval()
    return {"steps": steps, "seconds": round(time.time() - start, 1), "final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def perplexity(model, stream: np.ndarray, context: int, batch_size: int) -> dict:
    """exp(mean loss) over non-overlapping `context`-token windows of `stream` (every token but each window's first
    is predicted)."""
    windows = stream[: len(stream) // context * context].reshape(-1, context)
    total, count = 0.0, 0
    for s in range(0, len(windows), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(windows[s : s + batch_size]))
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += x[:, 1:].numel()
    mean = total / count
    return {"context": context, "windows": len(windows), "tokens": count, "loss": mean, "perplexity": math.exp(mean)}


def plot(results: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, block in results["models"].items():
        xs = [r["context"] for r in block["perplexity"]]
        ys = [r["perplexity"] for r in block["perplexity"]]
        ax.plot(xs, ys, marker="o", label=block["label"])
    for x, ls in ((results.get("attention_window"), ":"), (results.get("train_block_size"), "--")):
        if x:
            ax.axvline(x, color="grey", ls=ls, lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["context_lengths"])
    ax.set_xticklabels([str(c) for c in results["context_lengths"]])
    ax.set_xlabel("context length (tokens); dotted: attention window, dashed: training block")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"Perplexity vs context ({results['eval_tokens']} held-out tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path", help="saved model folder (loaded with trust_remote_code=True) or Hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    p.add_argument("--output", default=os.path.join(ROOT, "results", "eval_ppl.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--context_lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--max_eval_tokens", type=int, default=32768, help="cap on the held-out tokens (0: all)")
    p.add_argument("--batch_size", type=int, default=8, help="evaluation batch (windows)")
    # data: as scripts/train.py
    p.add_argument("--train_files", nargs="+", default=None, help="local text files (default: stdlib sources)")
    p.add_argument("--validation_files", nargs="+", default=None)
    p.add_argument("--text_column", default="text")
    p.add_argument("--block_size", type=int, default=256, help="training block size of the model (train.py)")
    p.add_argument("--validation_split_percentage", type=float, default=5.0)
    p.add_argument("--stdlib_max_bytes", type=int, default=None)
    p.add_argument("--data_seed", type=int, default=0, help="seed of the stdlib file order (train.py --seed)")
    # the Llama baseline
    p.add_argument("--llama_path", default=None, help="a trained baseline to load instead of training one")
    p.add_argument("--no_llama", action="store_true", help="evaluate the model only")
    p.add_argument("--llama_steps", type=int, default=None, help="default: the model's global_step")
    p.add_argument("--llama_batch_size", type=int, default=None)
    p.add_argument("--llama_learning_rate", type=float, default=None)
    p.add_argument("--llama_warmup_steps", type=int, default=None)
    p.add_argument("--llama_weight_decay", type=float, default=None)
    p.add_argument("--save_llama", default=None, help="folder to save the trained baseline to")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.plot = args.plot or os.path.splitext(args.output)[0] + ".png"
    args.context_lengths = sorted(set(args.context_lengths))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model_path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, trust_remote_code=True, dtype=torch.float32).eval()

    raw = load_raw_datasets(
        train_files=args.train_files, validation_files=args.validation_files, text_column=args.text_column,
        stdlib_max_bytes=args.stdlib_max_bytes, seed=args.data_seed,
    )  # fmt: skip
    blocks, counts = tokenize_and_pack(raw, tokenizer, args.block_size, args.text_column)
    blocks = split_validation(blocks, args.validation_split_percentage)
    train_blocks = np.asarray(blocks["train"]["input_ids"], dtype=np.int64)
    stream = np.asarray(blocks["validation"]["input_ids"], dtype=np.int64).reshape(-1)
    longest = max(args.context_lengths)
    if args.max_eval_tokens:
        stream = stream[: max(args.max_eval_tokens, longest)]
    stream = stream[: len(stream) // longest * longest]
    if len(stream) == 0:
        raise SystemExit(f"eval_ppl.py: error: the held-out split has fewer than {longest} tokens.")
    print(f"held-out: {len(stream)} tokens ({counts}); train: {len(train_blocks)} blocks of {args.block_size}")

    config = model.config
    results = {
        "model_path": args.model_path,
        "context_lengths": args.context_lengths,
        "eval_tokens": int(len(stream)),
        "train_block_size": args.block_size,
        "attention_window": getattr(config, "attention_window", None),
        "data": "stdlib sources" if not args.train_files else args.train_files,
        "models": {},
    }
    n_params = sum(p.numel() for p in model.parameters())
    keep = ("model_type", "variant", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "attention_window", "memory_layers", "memory_depth", "num_memory_heads",
            "memory_head_dim", "memory_chunk_size", "memory_max_lr")  # fmt: skip
    results["models"]["model"] = {
        "label": f"{type(model).__name__} {getattr(config, 'variant', '')}".strip(), "parameters": n_params,
        "config": {k: getattr(config, k) for k in keep if hasattr(config, k)},
        "training": training_budget(args.model_path),
    }  # fmt: skip

    if not args.no_llama:
        if args.llama_path:
            llama = AutoModelForCausalLM.from_pretrained(args.llama_path, dtype=torch.float32).eval()
            info = {"loaded_from": args.llama_path}
        else:
            budget = {"steps": 100, "batch_size": 8, "learning_rate": 3e-3, "weight_decay": 0.0, "warmup_steps": 0}
            budget.update(training_budget(args.model_path))
            for key in ("steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay"):
                if getattr(args, f"llama_{key}") is not None:
                    budget[key] = getattr(args, f"llama_{key}")
            torch.manual_seed(budget.get("seed", 0))
            llama = llama_like(config, max_positions=max(4096, longest))
            print(f"training the Llama baseline: {budget}")
            info = {"budget": budget, **train_llama(llama, train_blocks, budget)}
            if args.save_llama:
                llama.save_pretrained(args.save_llama)
                tokenizer.save_pretrained(args.save_llama)
        results["models"]["llama"] = {"label": "LlamaForCausalLM (full attention)",
                                      "parameters": sum(p.numel() for p in llama.parameters()), **info}  # fmt: skip
    for name, block in results["models"].items():
        net = model if name == "model" else llama
        block["perplexity"] = []
        for context in args.context_lengths:
            r = perplexity(net, stream, context, max(1, args.batch_size * min(args.context_lengths) // context))
            block["perplexity"].append(r)
            print(f"{block['label']}: context {context}: perplexity {r['perplexity']:.2f}", flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.plot)
    print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
