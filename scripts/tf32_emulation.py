"""How much plain tf32 products would cost the memory scan in accuracy, measured on a CPU by emulating them.

    python scripts/tf32_emulation.py [--lengths 1024 4096 16384] [--gates model|check] [--output FILE.json]

The fused GPU kernels multiply in tf32x3 by default (three tf32 products per product, fp32-level accuracy); plain
tf32 would take a third of the tensor-core work and spill fewer registers (`scripts/kernel_spills.py --precision tf32`).
This script runs the PyTorch scan (`_MemoryScanFunction`, forward and backward) three ways at the anchor sizes of
`scripts/gpu_triton_check.py` (B 4, H 4, d 64, E 128, chunk 64, depth 2, silu, M_init, its weights, q, k, v): in fp64 (the
reference), in fp32, and in fp32 with the operands of every matmul inside the scan rounded to tf32 (10-bit mantissa,
round to nearest even; accumulation stays fp32, as on tensor cores). It prints and writes, per length, the relative
error (max |x - ref| / max |ref| over each group) of the outputs and chunk-end states, of the gradients of every
input, and of the outputs alone. The kernels themselves are checked on a GPU by `gpu_triton_check.py --precision tf32`.

Gates (`gpu_triton_check.make_inputs`): `model` draws them as a freshly initialised model does (the state keeps about
0.99 of itself per token, so errors could build up along the sequence); `check` takes the GPU check's default ones,
whose forget gates keep under 1 % per token (only the momentum carries the past). Both run by default.
"""

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from gpu_triton_check import make_inputs, model_gates, scan  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import modeling_titans as mt  # noqa: E402


B, H, D, E, C, DEPTH, ACTIVATION = 4, 4, 64, 128, 64, 2, "silu"
_PRODUCTS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.bmm.default: (0, 1),
             torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.baddbmm.default: (1, 2)}  # fmt: skip


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to tf32's 10-bit mantissa (round to nearest, ties to even), kept in fp32."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192  # -8192 = 0xFFFFE000: clears the 13 dropped bits
    return bits.view(torch.float32).view(x.shape)


class TF32Products(TorchDispatchMode):
    """Rounds the two factors of every mm / bmm / addmm / baddbmm to tf32 (the added term stays fp32)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        factors = _PRODUCTS.get(func)
        if factors is not None:
            args = tuple(to_tf32(a) if i in factors else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


def _with_tf32(fn):
    def inner(*args, **kwargs):
        with TF32Products():
            return fn(*args, **kwargs)

    return inner


def relative_error(got, ref) -> float:
    return max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True))


def measure(T: int, seed: int = 0, gates: str = "model") -> dict:
    tensors = make_inputs(B, H, D, E, C, T, DEPTH, "cpu", seed=seed, gates=gates)
    # geometric mean of 1 - α per token (`check`: about exp(-5))
    keep = model_gates(B, H, C, T, seed)[2].mean().exp().item() if gates == "model" else None
    outs, _ = scan("torch", tensors, C, DEPTH, ACTIVATION)
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(o.shape, generator=gen) for o in outs]
    start = time.time()
    ref = scan("torch", [t.double() for t in tensors], C, DEPTH, ACTIVATION, [c.double() for c in cotangents])
    fp32 = scan("torch", tensors, C, DEPTH, ACTIVATION, cotangents)
    forward, backward = mt._scan_forward, mt._scan_backward
    mt._scan_forward, mt._scan_backward = _with_tf32(forward), _with_tf32(backward)  # the scan only, not the test
    try:
        tf32 = scan("torch", tensors, C, DEPTH, ACTIVATION, cotangents)
    finally:
        mt._scan_forward, mt._scan_backward = forward, backward
    row = {"tokens": T, "chunks": T // C, "gates": gates, "keep_per_token": keep and round(keep, 4)}
    for name, got in (("fp32", fp32), ("tf32", tf32)):
        row[name] = {"outputs": relative_error(got[0][:1], ref[0][:1]),
                     "outputs_and_states": relative_error(got[0], ref[0]),
                     "gradients": relative_error(got[1], ref[1])}  # fmt: skip
    row["seconds"] = round(time.time() - start, 1)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gates", nargs="+", choices=["model", "check"], default=["model", "check"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["TITANS_MEMORY_KERNEL"] = "torch"  # the PyTorch scan, whatever the device offers
    result = {"torch": torch.__version__, "sizes": dict(B=B, H=H, d=D, E=E, chunk=C, depth=DEPTH, activation=ACTIVATION),
              "seed": args.seed, "rows": []}  # fmt: skip
    for gates in args.gates:
        for T in args.lengths:
            row = measure(T, args.seed, gates)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
