"""The fused Triton memory scan (`_tk_scan_fwd` / `_tk_scan_bwd`) against the PyTorch scan it replaces on GPU.

Skipped without triton. Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported; numpy-backed and slow), at the smallest sizes the kernels accept (d=16, E=32, chunk 16,
tl.dot needs >= 16) and 3 chunks. Tolerance: in the interpreter fp32 with exact (ieee) products on both sides, so
only the order of summation differs: max |kernel - torch| <= 2e-5 * max |torch| for every output, state and gradient
(seen: <= 5e-6); on a GPU the kernels' default tf32x3 products, <= 1e-4 * max |torch| (H200: results/gpu_h200_kernel/tkernel.log).
"""

import os

import pytest
import torch


triton = pytest.importorskip("triton")

import modeling_titans as mt  # noqa: E402


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    mt.triton is None or (DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton compiled for a GPU, or its interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
# interpreter: exact fp32 products on both sides; GPU: the kernels' default tf32x3 products against cuBLAS fp32
PRECISION, RTOL = ("ieee", 2e-5) if DEVICE.type == "cpu" else (mt._TRITON_PRECISION, 1e-4)
B, H, D, E, C, T = 2, 2, 16, 32, 16, 48


@pytest.fixture(autouse=True)
def _interpreter_numpy_index():
    """Triton 3.6's interpreter turns a runtime scalar into an int with int(ndarray of shape (1,)), which NumPy >= 2.4
    rejects, so `range(n_chunks)` fails there; read the element instead (interpreter only, test-local)."""
    if DEVICE.type != "cpu":
        yield
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    yield
    interpreter._patch_lang_tensor = original


@pytest.fixture
def spy(monkeypatch):
    """Counts the kernel launches (forward, backward) and forces the kernel (failures raise instead of falling back)."""
    calls = {"forward": 0, "backward": 0}
    fwd, bwd = mt._triton_scan_forward, mt._triton_scan_backward

    def forward(*args, **kwargs):
        calls["forward"] += 1
        return fwd(*args, **kwargs)

    def backward(*args, **kwargs):
        calls["backward"] += 1
        return bwd(*args, **kwargs)

    monkeypatch.setattr(mt, "_triton_scan_forward", forward)
    monkeypatch.setattr(mt, "_triton_scan_backward", backward)
    monkeypatch.setattr(mt, "_TRITON_PRECISION", PRECISION)
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "triton")
    return calls


def _problem(depth, with_initial, d=D, hidden=E, weight_batch=B, seed=0):
    """Weights, momentum, M_init and the 8 sequence inputs (q, k, v and the chunk coefficients) of one scan."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    dims = [d] + [hidden] * (depth - 1) + [d]
    weights = [rand(weight_batch, H, dims[i + 1], dims[i]) / dims[i] ** 0.5 for i in range(depth)]
    momentum = [0.1 * rand(weight_batch, H, dims[i + 1], dims[i]) / dims[i] ** 0.5 for i in range(depth)]
    initial = [rand(1, H, dims[i + 1], dims[i]) / dims[i] ** 0.5 for i in range(depth)] if with_initial else []
    q, v = rand(B, H, T, d), rand(B, H, T, d)
    k = torch.nn.functional.normalize(rand(B, H, T, d), dim=-1)
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(B, H, T, generator=gen)  # noqa: E731
    lr, eta, alpha = uniform(0.0, 0.2), uniform(0.5, 1.0), uniform(0.0, 0.3)
    coefficients = mt.memory_chunk_coefficients(lr, eta.log(), (1 - alpha).log(), C)
    tensors = [*weights, *momentum, *initial, q, k, v, *coefficients]
    return [t.to(DEVICE).contiguous() for t in tensors]


def _run(tensors, depth, activation, cotangent_seed=1, operator=False):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    if operator:  # what compiled graphs call: outputs and end states, then the chunk-start states it keeps
        outs = mt._MEMORY_SCAN_OP(leaves, None, depth, C, activation, True)[: 1 + 2 * depth]
    else:
        outs = mt._MemoryScanFunction.apply(C, activation, depth, None, *leaves)
    gen = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=gen).to(DEVICE) for o in outs]
    torch.autograd.backward(outs, cotangents)
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _assert_close(got, ref, what):
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a.shape == b.shape, (what, i)
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= RTOL * scale + 1e-7, f"{what}[{i}]: max abs error {err:.3g} vs max abs {scale:.3g}"


@pytest.mark.parametrize(
    "depth, with_initial, activation, weight_batch",
    [
        (1, False, "silu", B),
        (1, True, "silu", 1),  # weights broadcast over the batch (the first chunk of a sequence): summed gradients
        (2, False, "silu", B),
        (2, True, "silu", B),
        (2, True, "gelu", 1),
        (2, True, "tanh", B),
    ],
)
def test_kernel_matches_torch_scan(spy, monkeypatch, depth, with_initial, activation, weight_batch):
    """Outputs, chunk-end weights and momentum, and the gradients of every input (states, M_init, q, k, v, g, n_last,
    β, f, m): the kernel pair against `_MemoryScanFunction` on the PyTorch path."""
    tensors = _problem(depth, with_initial, weight_batch=weight_batch, seed=depth * 7 + with_initial)
    out, grads = _run(tensors, depth, activation)
    assert spy == {"forward": 1, "backward": 1}
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "torch")
    ref_out, ref_grads = _run(tensors, depth, activation)
    assert spy == {"forward": 1, "backward": 1}
    _assert_close(out, ref_out, "outputs/states")
    _assert_close(grads, ref_grads, "gradients")


@pytest.mark.parametrize(
    "with_initial, activation, weight_batch", [(False, "silu", B), (True, "gelu", 1), (True, "tanh", B)]
)
def test_blocked_kernels_match_torch_scan(spy, monkeypatch, with_initial, activation, weight_batch):
    """TITANS_MEMORY_KERNEL_BLOCK=16 at E = 32: the depth-2 kernels that take the hidden width in two blocks
    (`_tk_scan_fwd_blocked` / `_tk_scan_bwd_blocked`, four passes over the blocks in the backward) give the outputs,
    states and every gradient of the PyTorch scan."""
    monkeypatch.setattr(mt, "_TRITON_BLOCK", "16")
    monkeypatch.setattr(mt, "_tk_scan_fwd", None)  # the unblocked kernels must not run
    monkeypatch.setattr(mt, "_tk_scan_bwd", None)
    tensors = _problem(2, with_initial, weight_batch=weight_batch, seed=11 + with_initial)
    out, grads = _run(tensors, 2, activation)
    assert spy == {"forward": 1, "backward": 1}
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "torch")
    ref_out, ref_grads = _run(tensors, 2, activation)
    _assert_close(out, ref_out, "outputs/states")
    _assert_close(grads, ref_grads, "gradients")


@pytest.mark.parametrize("block", [None, "16"])
def test_scan_operator_runs_the_kernels(spy, monkeypatch, block):
    """The scan operator of compiled graphs (`_MEMORY_SCAN_OP`) runs the kernel pair, its backward from the
    chunk-start states it returned (n_chunks slots of the forward's buffers), and matches the PyTorch scan; so do the
    blocked kernels (TITANS_MEMORY_KERNEL_BLOCK=16)."""
    monkeypatch.setattr(mt, "_TRITON_BLOCK", block)
    tensors = _problem(2, True, seed=5)
    out, grads = _run(tensors, 2, "silu", operator=True)
    assert spy == {"forward": 1, "backward": 1}
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "torch")
    ref_out, ref_grads = _run(tensors, 2, "silu")
    _assert_close(out, ref_out, "outputs/states")
    _assert_close(grads, ref_grads, "gradients")


def test_no_grad_scan_uses_kernel(spy, monkeypatch):
    """`memory_scan` without autograd (generation, `_current`) runs the forward kernel with a 2-slot state buffer."""
    depth = 2
    *state, q, k, v, g, n_last, beta, f, m = _problem(depth, True)
    weights, momentum, initial = state[:depth], state[depth : 2 * depth], state[2 * depth :]
    gen = torch.Generator().manual_seed(3)
    gates = [torch.rand(B, H, T, generator=gen).to(DEVICE) for _ in range(3)]
    lr, log_eta, log_keep = 0.1 * gates[0], -gates[1], -0.1 * gates[2]
    with torch.no_grad():
        got = mt.memory_scan(weights, momentum, q, k, v, lr, log_eta, log_keep, C, "silu", initial=initial)
        assert spy["forward"] == 1
        monkeypatch.setenv("TITANS_MEMORY_KERNEL", "torch")
        ref = mt.memory_scan(weights, momentum, q, k, v, lr, log_eta, log_keep, C, "silu", initial=initial)
    assert spy["forward"] == 1
    _assert_close([got[0], *got[1], *got[2]], [ref[0], *ref[1], *ref[2]], "no-grad scan")


def test_unsupported_shapes_fall_back(spy):
    """d = 8 (below tl.dot's 16), a chunk that is no power of two, depth 3 and a ragged `select_chunk` keep the
    PyTorch scan, without error, even when the kernel is asked for."""
    for depth, d, chunk, select in ((2, 8, 16, None), (1, 16, 12, None), (2, 16, 16, torch.tensor([1, 3], device=DEVICE))):
        tensors = _problem(depth, True, d=d)
        if chunk != C:
            tensors[-5:] = mt.memory_chunk_coefficients(*(torch.rand(3, B, H, T) * 0.1).to(DEVICE), chunk)
        assert not mt._use_triton_scan(tensors, depth, chunk, "silu", select)
        leaves = [t.clone().requires_grad_() for t in tensors]
        out, *_ = mt._MemoryScanFunction.apply(chunk, "silu", depth, select, *leaves)
        out.sum().backward()
    tensors = _problem(3, False)
    assert not mt._use_triton_scan(tensors, 3, C, "silu", None)
    assert spy == {"forward": 0, "backward": 0}


def test_dispatch_switch(monkeypatch):
    """TITANS_MEMORY_KERNEL: `torch` never uses the kernel, an unknown value is an error; `auto` (also the default,
    unset) only on CUDA tensors; `triton` also on CPU tensors under the interpreter."""
    tensors = _problem(1, False)
    monkeypatch.delenv("TITANS_MEMORY_KERNEL", raising=False)  # default: `auto`
    assert mt._use_triton_scan(tensors, 1, C, "silu", None) == (DEVICE.type == "cuda")
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "torch")
    assert not mt._use_triton_scan(tensors, 1, C, "silu", None)
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "fused")
    with pytest.raises(ValueError, match="TITANS_MEMORY_KERNEL"):
        mt._use_triton_scan(tensors, 1, C, "silu", None)
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "auto")
    assert mt._use_triton_scan(tensors, 1, C, "silu", None) == (DEVICE.type == "cuda")
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "triton")
    assert mt._use_triton_scan(tensors, 1, C, "silu", None)
    assert not mt._use_triton_scan([t.double() for t in tensors], 1, C, "silu", None)  # fp32 only


@pytest.mark.parametrize("compiled", [False, True])
def test_model_training_step_matches(spy, monkeypatch, compiled):
    """A whole TitansForCausalLM training step (MAG, d=16, chunk 16, two chunks) has the same loss and parameter
    gradients with the kernels as with the PyTorch scan; also through torch.compile(model) (dynamo's aot_eager
    backend), where the kernels run inside the scan operator of the captured graph."""
    from conftest import randomize, tiny_config

    from modeling_titans import TitansForCausalLM

    model = randomize(TitansForCausalLM(tiny_config("mag", memory_head_dim=16, memory_chunk_size=16))).to(DEVICE)
    ids = torch.randint(2, 64, (2, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    if compiled:
        torch._dynamo.reset()
    forward = torch.compile(model, backend="aot_eager") if compiled else model

    def step():
        model.zero_grad(set_to_none=True)
        loss = forward(ids, labels=ids).loss
        loss.backward()
        return [loss.detach()], [p.grad for p in model.parameters() if p.grad is not None]

    loss, grads = step()
    assert spy["forward"] >= 1 and spy["backward"] == spy["forward"]
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "torch")
    ref_loss, ref_grads = step()
    _assert_close(loss, ref_loss, "loss")
    _assert_close(grads, ref_grads, "parameter gradients")


def test_kernel_spills_script_reports_the_compiled_resources():
    """scripts/kernel_spills.py compiles a kernel for sm_90 without a GPU and reads ptxas's figures: at the smallest
    sizes the forward fits its registers, and 4 warps give 128 threads; so does the blocked forward (`--block`)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "kernel_spills.py"), "--kernel", "fwd", "--d", "16", "--e",
           "32", "--chunk", "16", "--num-warps", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this triton build has no bundled ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["kernel"] == "fwd" and stats["threads"] == 128 and stats["D"] == 16
    assert 0 < stats["registers"] <= 255 and stats["stack_bytes_per_thread"] == 0
    assert stats["shared_bytes"] > 0 and stats["spill_store_bytes_per_thread"] == 0
    # the blocked forward (`--block`, E = 32 in two blocks of 16) compiles too, and reports its block
    proc = subprocess.run(cmd + ["--block", "16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (stats["kernel"], stats["EB"], stats["E"]) == ("fwd", 16, 32) and "DEPTH" not in stats
    assert 0 < stats["registers"] <= 255 and stats["spill_store_bytes_per_thread"] == 0
