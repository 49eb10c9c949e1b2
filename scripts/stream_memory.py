#!/usr/bin/env python
"""Stream a long token sequence through a TitansCache and record whether the memory stays finite and bounded.

    .venv/bin/python scripts/stream_memory.py --tokens 1000000 --output results/stream_1m.json

By default a randomly initialised model of the given variant is used (the memory's numerics do not need a trained
model); `--model_name_or_path` streams through a saved Titans instead. Tokens are random ids, fed in chunks of
`--chunk` tokens (the chunk-parallel prefill path; decoding uses the same state). For each dtype the script
records, every `--every` tokens, the largest memory weight norm, the largest momentum norm and whether any logit
or state was non-finite.
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configuration_titans import TitansConfig  # noqa: E402
from modeling_titans import TitansCache, TitansForCausalLM  # noqa: E402


def stream(model, tokens, chunk, every, seed):
    cache = TitansCache(model.config)
    gen = torch.Generator().manual_seed(seed)
    records, finite, start = [], True, time.time()
    with torch.no_grad():
        for seen in tqdm(range(0, tokens, chunk), unit_scale=chunk, unit="tok"):
            ids = torch.randint(0, model.config.vocab_size, (1, min(chunk, tokens - seen)), generator=gen)
            logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            states = [layer.memory for layer in cache.layers if layer.memory is not None]
            ok = bool(torch.isfinite(logits.float()).all()) and all(
                torch.isfinite(t).all() for s in states for t in s.weights + s.momentum
            )
            finite &= ok
            done = seen + ids.shape[1]
            if done % every < chunk or not ok or done == tokens:
                records.append(
                    {
                        "tokens": done,
                        "finite": ok,
                        "max_weight_norm": max(float(w.norm()) for s in states for w in s.weights),
                        "max_momentum_norm": max(float(m.norm()) for s in states for m in s.momentum),
                    }
                )
            if not ok:
                break
    return {
        "finite": finite,
        "tokens": cache.get_seq_length(),
        "seconds": time.time() - start,
        "cache_bytes": cache.nbytes(),
        "max_weight_norm": max(r["max_weight_norm"] for r in records),
        "trace": records,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--every", type=int, default=50_000)
    parser.add_argument("--variant", default="mag", choices=["mac", "mag", "mal", "lmm"])
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="results/stream_1m.json")
    args = parser.parse_args()

    results = {"command": " ".join(sys.argv), "torch": torch.__version__, "machine": platform.machine(), "runs": {}}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(args.seed)
        if args.model_name_or_path:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=True, dtype=dtype)
        else:
            config = TitansConfig(
                variant=args.variant, vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                num_attention_heads=2, attention_window=64, num_memory_heads=2, memory_head_dim=64,
                memory_chunk_size=16,
            )  # fmt: skip
            model = TitansForCausalLM(config).to(dtype)
        model.eval()
        run = stream(model, args.tokens, args.chunk, args.every, args.seed)
        results["runs"][dtype_name] = run
        print(
            f"{dtype_name}: {run['tokens']} tokens in {run['seconds']:.0f}s, finite={run['finite']}, "
            f"max memory weight norm={run['max_weight_norm']:.3f}, cache={run['cache_bytes']} bytes"
        )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    if not all(r["finite"] for r in results["runs"].values()):
        sys.exit("the memory became non-finite; see " + args.output)


if __name__ == "__main__":
    main()
