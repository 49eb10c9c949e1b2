"""Compile the fused memory kernels for a GPU architecture on any machine (no GPU needed) and report their resources.

    python scripts/kernel_spills.py [--kernel fwd bwd] [--precision tf32x3] [--num-warps 8] [--arch 90] [--block 32]

Triton compiles `_tk_scan_fwd` / `_tk_scan_bwd` to PTX for the target, and the ptxas bundled with Triton (`-v`)
reports registers, spill space and spill traffic per thread. This is how the register pressure of a kernel change can
be compared before a GPU is available (a GPU run measures the speed; these numbers only say where spills grow or
shrink). At the anchor sizes (d 64, E 128, chunk 64, depth 2, tf32x3) a backward compile takes about 3 minutes on a
slow CPU, a forward about 20 s. Prints one JSON line per kernel.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import modeling_titans as mt  # noqa: E402


INTS = {"n_chunks", "heads", "state_slots", "BH"}  # runtime integer arguments; every other non-constexpr is a pointer


def compile_stats(kernel, constants, num_warps, arch):
    """ptxas -v figures for one kernel compiled with `constants` (its constexprs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constants else "i32" if n in INTS else "*fp32" for n in names}
    constexprs = {(i,): constants[n] for i, n in enumerate(names) if n in constants}
    # pointers 16-byte aligned, as torch allocations are: the specialisation a launch would get
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n] == "*fp32"}
    start = time.time()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": 1})  # fmt: skip
    seconds = time.time() - start
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True, check=True)  # fmt: skip
    text = report.stdout + report.stderr

    def number(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else None

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_bytes_per_thread": number(r"(\d+) bytes stack frame"),
        "spill_store_bytes_per_thread": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes_per_thread": number(r"(\d+) bytes spill loads"),
        "shared_bytes": compiled.metadata.shared,
        "threads": 32 * num_warps,
        "compile_s": round(seconds, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"])
    parser.add_argument("--precision", default=mt._TRITON_PRECISION, choices=["ieee", "tf32x3", "tf32"])
    parser.add_argument("--num-warps", type=int, default=None, choices=(1, 2, 4, 8, 16),
                        help="default: the launch's (8 at E >= 128, else 4)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--d", type=int, default=64, help="memory head dimension")
    parser.add_argument("--e", type=int, default=128, help="memory hidden width (depth 2)")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2, choices=[1, 2])
    parser.add_argument("--activation", default="silu", choices=sorted(mt._TRITON_ACTIVATIONS))
    parser.add_argument("--no-init", action="store_true", help="without M_init (memory_init_learnable off)")
    parser.add_argument("--block", type=int, default=None,
                        help="hidden-width block of the blocked depth-2 kernels (TITANS_MEMORY_KERNEL_BLOCK)")
    args = parser.parse_args(argv)
    if mt.triton is None:
        parser.error("needs triton")
    E = args.e if args.depth == 2 else args.d
    warps = args.num_warps or mt._triton_warps(E)
    if args.block is not None and (args.depth != 2 or not 16 <= args.block < E):
        parser.error("--block needs depth 2 and 16 <= block < E")
    mt._TRITON_BLOCK = None if args.block is None else str(args.block)  # as TITANS_MEMORY_KERNEL_BLOCK would
    constants = mt._triton_constants(args.depth, args.d, E, args.chunk, args.activation, not args.no_init,
                                     args.precision)  # fmt: skip
    if "EB" in constants:
        kernels = {"fwd": mt._tk_scan_fwd_blocked, "bwd": mt._tk_scan_bwd_blocked}
    else:
        kernels = {"fwd": mt._tk_scan_fwd, "bwd": mt._tk_scan_bwd}
    for name in args.kernel:
        kernel = kernels[name]
        stats = compile_stats(kernel, constants, warps, args.arch)
        print(json.dumps({"kernel": name, "arch": args.arch, "num_warps": warps, **constants, **stats}), flush=True)


if __name__ == "__main__":
    main()
