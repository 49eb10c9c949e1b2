# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Kernel launches and host reads of one training step on an accelerator, counted without one.

    python scripts/count_ops.py [--models swa,mag,llama] [--lengths 4096,32768] [--batch 4] [--hidden-size 1024 ...]

One training step (forward + backward, loss on every position, as `benchmark.py` times it) runs on the meta device,
which dispatches the same aten operations as CUDA but computes nothing: 32k tokens at a GPU-sized width count in
seconds on a CPU. Every aten call that is neither a view nor an allocation is at least one kernel launch on a GPU,
and every host read of a tensor's value (`Tensor.item()`, `bool(t)`) waits for the GPU to drain its queue. On a GPU a
step of small kernels costs a few microseconds per launch whatever the kernel does, so a count that grows with the
length is time that grows with it, and a step of thousands of launches is bounded by them.

The memory scan takes the path of CUDA's default (`TITANS_MEMORY_KERNEL=auto`): the fused Triton kernels, whose
launches are counted (one forward, one backward per memory layer) but not run. A host read returns 1 on meta (every
`.all()` check passes). MAC cuts its segments where the positions say (`nonzero`), which meta cannot give: it is not
countable here. Dimensions default to the anchor configuration of `benchmark.py`.
"""

import argparse
import collections
import json
import os
import sys
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmark  # noqa: E402
import modeling_titans as mt  # noqa: E402


aten = torch.ops.aten
NO_KERNEL = {aten._unsafe_view, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
             aten.new_empty_strided, aten.lift_fresh}  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    """Counts aten calls by kind: views, allocations, host reads (answered with 1) and the rest (kernels)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.views, self.host_reads = collections.Counter(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is aten._local_scalar_dense:  # a host read: a GPU sync; meta has no value to give
            self.host_reads += 1
            return 1
        if func.is_view or func.overloadpacket in NO_KERNEL:
            self.views += 1
        else:
            self.kernels[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _FakeTriton:
    """Stands for a fused kernel: `kernel[grid](...)` counts one launch and runs nothing."""

    def __init__(self, counter: collections.Counter, name: str):
        self.counter, self.name = counter, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.counter.update([self.name])


def count_step(model_name: str, dims: dict, length: int, batch: int, triton: bool = True) -> dict:
    """Launch counts of one training step of `model_name` (a `benchmark.py` model) at batch × length on meta."""
    model, _, _ = benchmark.build_model(model_name, dims, length, "cpu", None)
    model = model.to("meta").train()
    launches = collections.Counter()
    patched = dict(_use_triton_scan=lambda *args: False)  # the PyTorch scan (what meta tensors get anyway)
    if triton:  # the fused scan's path, as on CUDA (create: the kernels are absent where triton is not installed)
        patched = dict(_use_triton_scan=lambda *args: True, _tk_scan_fwd=_FakeTriton(launches, "scan_fwd"),
                       _tk_scan_bwd=_FakeTriton(launches, "scan_bwd"))  # fmt: skip
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    # CUDA's default path (not `compile`, whatever this shell sets); both patches are undone on leaving
    with mock.patch.dict(os.environ, {"TITANS_MEMORY_KERNEL": "auto"}), mock.patch.multiple(mt, create=True, **patched):
        with LaunchCounter() as counter:
            # embeddings passed in: the vocabulary check reads the ids on the host, which meta cannot answer
            logits = model(inputs_embeds=model.get_input_embeddings()(ids)).logits  # use_cache as Trainer leaves it
            logits.float().mean().backward()
    return {
        "model": model_name,
        "length": length,
        "batch": batch,
        "kernel_calls": sum(counter.kernels.values()) + sum(launches.values()),
        "triton_launches": dict(launches),
        "host_reads": counter.host_reads,
        "view_calls": counter.views,
        "top_kernels": counter.kernels.most_common(8),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    p.add_argument("--models", default="swa,mag,mal,lmm,llama", help="comma list of benchmark.py models (not mac)")
    p.add_argument("--lengths", default="4096,32768")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--torch-scan", action="store_true", help="count the PyTorch chunk scan instead of the Triton kernels")
    p.add_argument("--output", default=None, help="JSON path for the counts")
    dims = p.add_argument_group("model dimensions (default: the anchor configuration)")
    for key, value in benchmark.FULL_DIMS.items():
        dims.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None, help=f"default {value}")
    args = p.parse_args(argv)
    dims = {key: getattr(args, key) if getattr(args, key) is not None else value
            for key, value in benchmark.FULL_DIMS.items()}  # fmt: skip
    models = args.models.split(",")
    if "mac" in models:
        p.error("mac cannot be counted on the meta device (its segment cuts read the positions)")
    rows = []
    print(f"{'model':8s} {'length':>7s} {'kernels':>8s} {'triton':>7s} {'host reads':>10s}  most frequent kernels")
    for name in models:
        for length in (int(n) for n in args.lengths.split(",")):
            row = count_step(name, dims, length, args.batch, triton=not args.torch_scan)
            rows.append(row)
            top = ", ".join(f"{k} {n}" for k, n in row["top_kernels"][:4])
            print(f"{name:8s} {length:7d} {row['kernel_calls']:8d} {sum(row['triton_launches'].values()):7d} "
                  f"{row['host_reads']:10d}  {top}")  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"dims": dims, "batch": args.batch, "torch_scan": args.torch_scan, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
