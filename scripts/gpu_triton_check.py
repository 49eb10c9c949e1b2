"""Check the fused Triton memory scan against the PyTorch scan on a CUDA machine, and time both (not a test).

    python scripts/gpu_triton_check.py [--precision tf32x3|tf32|ieee] [--lengths 4096 32768] [--scaling 4 8 16 32]
        [--num-warps 4] [--block 32]

The first run compiles the kernels (tf32x3: ~20 s forward, ~2 min backward on a slow CPU; ieee: many minutes);
Triton caches them in ~/.triton/cache. Give the first run ~5 minutes.

Anchor sizes: B=4, H=4, d=64, E=128 (depth 2), chunk 64, silu, with M_init. Compares forward outputs, chunk-end
states and every input gradient (max abs error, and relative = max abs error / max abs reference), then times
forward + backward of the scan both ways (CUDA events, median of 5 after 2 warm-ups). Prints one JSON line; exits
non-zero on a mismatch beyond tolerance or if the kernel fails (the exception and traceback are printed).

`--scaling B ...` then times the kernels alone at `--scaling-length` tokens for each batch size B (B x 4 programs).
Per-program work is the same, so on a GPU with enough multiprocessors flat times mean the programs run side by side
and times growing with B mean they share a bottleneck (the model card's GPU-sized run suggested the latter). Only the
B x H program count changes, not the kernel's specialisation, so this compiles nothing new.
"""

import argparse
import json
import os
import statistics
import sys
import traceback


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import modeling_titans as mt  # noqa: E402


# relative error bounds (max abs error / max abs of the reference) per precision of the kernel's tl.dot
TOLERANCE = {"ieee": 1e-3, "tf32x3": 1e-3, "tf32": 5e-2}


def make_inputs(B, H, d, E, C, T, depth, device, seed=0, gates="check"):
    """Weights (M_init copied over the batch, zero momentum), M_init, unit q, k, v, and the chunk coefficients of
    random gates. `check` (the default, as in every GPU run so far): forget gates keep only about exp(-5) of the state
    per token, so the momentum alone carries the past; `model`: gates drawn as at initialisation (`model_gates`),
    where the state keeps about 0.99 of itself per token."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dims = [d] + [E] * (depth - 1) + [d]
    init = [rnd(1, H, dims[i + 1], dims[i]) / dims[i] ** 0.5 for i in range(depth)]
    weights = [w.expand(B, -1, -1, -1).clone() for w in init]
    momentum = [torch.zeros_like(w) for w in weights]
    q, k, v = (torch.nn.functional.normalize(rnd(B, H, T, d), dim=-1) for _ in range(3))
    lr = torch.sigmoid(rnd(B, H, T) - 3.0) * 0.5
    log_eta = torch.nn.functional.logsigmoid(rnd(B, H, T) + 2.0)
    log_keep = torch.nn.functional.logsigmoid(-(rnd(B, H, T) + 5.0))
    if gates == "model":
        lr, log_eta, log_keep = model_gates(B, H, C, T, seed)
    coefficients = mt.memory_chunk_coefficients(lr.to(device), log_eta.to(device), log_keep.to(device), C)
    tensors = [t.to(device) for t in (*weights, *momentum, *init, q, k, v)] + list(coefficients)
    return [t.contiguous() for t in tensors]


def model_gates(B, H, C, T, seed=0):
    """θ, log η, log(1 - α) as a freshly initialised model draws them: `memory_gates` with unit-normal logits, the
    initial gate biases (θ 0, α -5, η -2; `TitansPreTrainedModel._init_weights`) and max θ 1/C (the benchmark's)."""
    gen = torch.Generator().manual_seed(seed + 2)
    logits = [torch.randn(B, T, H, generator=gen) for _ in range(3)]
    bias = torch.tensor([[0.0], [-5.0], [-2.0]]).expand(3, H)
    return mt.memory_gates(*logits, bias, 1.0 / C, torch.float32).unbind(-1)


def scan(mode, tensors, C, depth, activation, grads=None):
    """Forward (+ backward if `grads`, the output cotangents) of `_MemoryScanFunction` with the kernel on or off."""
    os.environ["TITANS_MEMORY_KERNEL"] = mode
    leaves = [t.detach().requires_grad_() for t in tensors]
    outs = mt._MemoryScanFunction.apply(C, activation, depth, None, *leaves)
    if grads is None:
        return outs, None
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad for t in leaves]


def compare(name, got, ref, report):
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    rel = err / max(scale, 1e-30)
    report[name] = {"max_abs": err, "rel": rel}
    return rel


def kernel_info():
    """Registers, spills and shared memory of the compiled kernels (best effort: Triton-internal attributes)."""
    info = {}
    try:
        for name in ("_tk_scan_fwd", "_tk_scan_bwd", "_tk_scan_fwd_blocked", "_tk_scan_bwd_blocked"):
            for cache in getattr(mt, name).device_caches.values():
                for kernel in cache[0].values():
                    info[name] = {"n_regs": kernel.n_regs, "n_spills": kernel.n_spills,
                                  "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps}
    except Exception as e:  # noqa: BLE001
        info["error"] = repr(e)
    return info


def timed(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default=mt._TRITON_PRECISION, choices=["ieee", "tf32x3", "tf32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--check-length", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--activation", default="silu")
    parser.add_argument("--num-warps", type=int, default=None, choices=(1, 2, 4, 8, 16),
                        help="warps per program (TITANS_MEMORY_KERNEL_WARPS)")
    parser.add_argument("--block", type=int, default=None, choices=(16, 32, 64),
                        help="hidden-width block: the blocked depth-2 kernels (TITANS_MEMORY_KERNEL_BLOCK)")
    parser.add_argument("--gates", default="check", choices=["check", "model"],
                        help="random gates of the check (`make_inputs`); `model`: as at initialisation")
    parser.add_argument("--scaling", type=int, nargs="*", default=[], help="batch sizes for the program-count sweep")
    parser.add_argument("--scaling-length", type=int, default=4096)
    parser.add_argument("--output", default=None, help="also write the final JSON here")
    args = parser.parse_args()

    def report(result):
        print(json.dumps(result), flush=True)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)

    B, H, d, E, C = 4, 4, 64, 128, 64
    if args.num_warps:
        mt._TRITON_WARPS = str(args.num_warps)
    if args.block:
        mt._TRITON_BLOCK = str(args.block)
    depth, act = args.depth, args.activation
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
              "torch": torch.__version__, "precision": args.precision, "B": B, "H": H, "d": d, "E": E, "C": C,
              "depth": depth, "activation": act, "num_warps": mt._triton_warps(E),
              "block": mt._triton_block(depth, E), "gates": args.gates, "ok": False}  # fmt: skip
    try:
        import triton

        result["triton"] = triton.__version__
    except Exception:
        result["triton"] = None
    if not torch.cuda.is_available() or result["triton"] is None:
        result["error"] = "needs CUDA and triton"
        report(result)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the PyTorch reference in full fp32
    torch.backends.cudnn.allow_tf32 = False
    mt._TRITON_PRECISION = args.precision
    tol = TOLERANCE[args.precision]
    device = torch.device("cuda")
    ok = True
    try:
        tensors = make_inputs(B, H, d, E, C, args.check_length, depth, device, gates=args.gates)
        result["dispatch"] = mt._use_triton_scan(tensors, depth, C, act, None)
        os.environ["TITANS_MEMORY_KERNEL"] = "triton"
        assert mt._use_triton_scan(tensors, depth, C, act, None), "kernel not dispatched at the anchor sizes"
        errors = {}
        result["errors"] = errors
        probe, _ = scan("torch", tensors, C, depth, act)
        with torch.no_grad():  # forward alone first: reported even if the backward kernel fails
            out, _ = scan("triton", tensors, C, depth, act)
        names = ["out"] + [f"state{i}" for i in range(2 * depth)]
        rels = [compare(n, a, b, errors) for n, a, b in zip(names, out, probe)]
        gen = torch.Generator(device=device).manual_seed(1)
        grads = [torch.randn(o.shape, device=device, generator=gen) for o in probe]
        ref_out, ref_grad = scan("torch", tensors, C, depth, act, grads)
        out, grad = scan("triton", tensors, C, depth, act, grads)
        gnames = [f"w{i}" for i in range(depth)] + [f"s{i}" for i in range(depth)] + [f"init{i}" for i in range(depth)]
        gnames += ["q", "k", "v", "g", "n_last", "beta", "f", "m"]
        rels += [compare("grad_" + n, a, b, errors) for n, a, b in zip(gnames, grad, ref_grad)]
        result["max_rel"] = max(rels)
        result["tolerance_rel"] = tol
        ok = max(rels) <= tol and all(r == r for r in rels)
        result["kernels"] = kernel_info()
        report({"phase": "check", **result})  # written now too: the timings below may not finish
    except Exception as e:  # kernel failed to compile or run: report, do not crash
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        report(result)
        return 1
    def time_modes(batch, T, modes):
        """Median ms of forward and of forward + backward of the scan in each mode, on fresh inputs."""
        tensors = make_inputs(batch, H, d, E, C, T, depth, device)
        gen = torch.Generator(device=device).manual_seed(1)
        probe, _ = scan(modes[0], tensors, C, depth, act)
        grads = [torch.randn(o.shape, device=device, generator=gen) for o in probe]
        del probe
        row = {}
        for mode in modes:
            row[f"{mode}_fwd_ms"] = timed(lambda: scan(mode, tensors, C, depth, act))
            row[f"{mode}_fwd_bwd_ms"] = timed(lambda: scan(mode, tensors, C, depth, act, grads))
        return row

    def rows(keys, measure, name):  # each row reported as it comes: a lease may end mid-way
        result[name] = {}
        for key in keys:
            try:
                result[name][str(key)] = measure(key)
            except Exception as e:
                traceback.print_exc()
                result[name][str(key)] = {"error": f"{type(e).__name__}: {e}"[:500]}
            torch.cuda.empty_cache()
            report({"phase": name, **result})

    def lengths_row(T):
        row = time_modes(B, T, ("triton", "torch"))
        row["speedup_fwd_bwd"] = row["torch_fwd_bwd_ms"] / row["triton_fwd_bwd_ms"]
        row["speedup_fwd"] = row["torch_fwd_ms"] / row["triton_fwd_ms"]
        return row

    rows(args.lengths, lengths_row, "timings")
    rows(args.scaling, lambda batch: {"programs": batch * H, **time_modes(batch, args.scaling_length, ("triton",))},
         "scaling")
    result["fallbacks"] = dict((str(k), v) for k, v in mt._TRITON_FAILED.items())
    result["ok"] = bool(ok)
    report(result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
