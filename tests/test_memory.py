"""The chunk-parallel memory (closed form + dual form) against the token-by-token recurrence of the paper."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_config
from reference import reference_memory

from modeling_titans import TitansNeuralMemory, memory_scan


def _random_problem(depth, seq_len, batch=2, heads=2, dim=5, hidden=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    dims = [dim] + [hidden] * (depth - 1) + [dim]
    weights = [rand(batch, heads, dims[i + 1], dims[i]) / dims[i] ** 0.5 for i in range(depth)]
    q, v = rand(batch, heads, seq_len, dim), rand(batch, heads, seq_len, dim)
    k = F.normalize(rand(batch, heads, seq_len, dim), dim=-1)
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(batch, heads, seq_len, generator=gen, dtype=torch.float64)  # noqa: E731
    return weights, q, k, v, uniform(0.0, 0.1), uniform(0.0, 1.0), uniform(0.0, 0.3)


def _scan(weights, q, k, v, lr, eta, alpha, chunk, initial=None):
    pad = -(-q.shape[2] // chunk) * chunk - q.shape[2]
    seq = lambda t: F.pad(t, (0, 0, 0, pad))  # noqa: E731
    gate = lambda t: F.pad(t, (0, pad))  # noqa: E731 (neutral padding: θ=0, log η=0, log(1-α)=0)
    momentum = tuple(torch.zeros_like(w) for w in weights)
    out, w_end, s_end = memory_scan(
        tuple(weights), momentum, seq(q), seq(k), seq(v), gate(lr), gate(eta.log()), gate((1 - alpha).log()), chunk,
        "silu", initial=tuple(weights if initial is None else initial),
    )  # fmt: skip
    return out[:, :, : q.shape[2]], w_end, s_end


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 3, 4, 13, 16])
def test_chunk_parallel_equals_token_recurrence(depth, chunk):
    seq_len = 13  # 3 and 4 do not divide 13; 16 is longer than the sequence
    weights, q, k, v, lr, eta, alpha = _random_problem(depth, seq_len, seed=depth * 31 + chunk)
    out, w_end, s_end = _scan(weights, q, k, v, lr, eta, alpha, chunk)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref_out, ref_w, ref_s = reference_memory(
                [w[b, h] for w in weights], q[b, h], k[b, h], v[b, h], lr[b, h], eta[b, h], alpha[b, h], chunk
            )
            torch.testing.assert_close(out[b, h], ref_out, atol=1e-6, rtol=0)
            if seq_len % chunk == 0:  # the returned state is the one after the last full chunk
                for got, want in zip(w_end, ref_w):
                    torch.testing.assert_close(got[b, h], want, atol=1e-6, rtol=0)
                for got, want in zip(s_end, ref_s):
                    torch.testing.assert_close(got[b, h], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("depth", [1, 2])
def test_forgetting_pulls_towards_the_initial_memory(depth):
    """A stream continued from a state M != M_init: α_t decays towards M_init (model card D7), token by token."""
    weights, q, k, v, lr, eta, alpha = _random_problem(depth, 11, seed=5)
    initial = [w + 0.5 * torch.randn_like(w) for w in weights]
    out, w_end, _ = _scan(weights, q, k, v, lr, eta, alpha * 2, 3, initial=initial)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref_out, ref_w, _ = reference_memory(
                [w[b, h] for w in weights], q[b, h], k[b, h], v[b, h], lr[b, h], eta[b, h], 2 * alpha[b, h], 3,
                initial=[w[b, h] for w in initial],
            )
            torch.testing.assert_close(out[b, h], ref_out, atol=1e-6, rtol=0)


def test_chunk_size_changes_semantics():
    """Guards the test above against passing trivially: chunk 1 and chunk 4 are different recurrences."""
    weights, q, k, v, lr, eta, alpha = _random_problem(2, 12)
    a = _scan(weights, q, k, v, lr * 3, eta, alpha, 1)[0]
    b = _scan(weights, q, k, v, lr * 3, eta, alpha, 4)[0]
    assert (a - b).abs().max() > 1e-4


def test_linear_memory_without_momentum_is_delta_rule():
    """App. C: with η = 0, α = 0 and b = 1 a linear Titans memory is DeltaNet with β = 2θ / (1 + ||k||²) (loss without
    ½, normalised step D19): β = θ for unit keys."""
    weights, q, k, v, lr, _, _ = _random_problem(1, 10, batch=1, heads=1)
    zero = torch.zeros_like(lr)
    eta = torch.full_like(lr, 1e-300)  # η → 0 (log η ≈ -690)
    out = _scan(weights, q, k, v, lr, eta, zero, 1)[0][0, 0]
    state = weights[0][0, 0].clone()
    for t in range(10):
        kt, vt = k[0, 0, t], v[0, 0, t]
        beta = 2 * lr[0, 0, t] / (1 + kt @ kt)
        state = state - beta * torch.outer(state @ kt - vt, kt)
        torch.testing.assert_close(out[t], state @ q[0, 0, t], atol=1e-10, rtol=0)


def _stream(memory, x, pieces):
    """The memory layer called on consecutive pieces of x (lengths `pieces`), carrying its state: outputs joined."""
    state, outs, start = None, [], 0
    for n in pieces:
        out, state = memory(x[:, start : start + n], state=state, return_state=True)
        outs.append(out)
        start += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_module_streaming_equals_one_call(depth):
    """The layer (projections, short conv, gates, chunked memory) continued token by token and in uneven pieces
    from a carried state equals a single call."""
    torch.manual_seed(0)
    config = tiny_config("lmm", memory_depth=depth, hidden_size=16, memory_chunk_size=4)
    memory = randomize(TitansNeuralMemory(config, 0).double())
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    full, _ = memory(x)
    for pieces in ([1] * 19, [5, 1, 7, 6], [19]):
        torch.testing.assert_close(_stream(memory, x, pieces), full.to(torch.float64), atol=1e-6, rtol=0)


def test_gradients_through_a_carried_state_equal_one_call():
    """MAC writes its memory segment by segment, carrying the state between calls: the outer gradients must flow
    through that state exactly as through one call (a loss on the last tokens only, so that the early tokens' and the
    parameters' gradients all pass through the carried weights, momentum, buffers and conv state)."""
    torch.manual_seed(0)
    config = tiny_config("lmm", memory_depth=2, hidden_size=16, memory_chunk_size=4)
    memory = randomize(TitansNeuralMemory(config, 0).double())
    x0, w = torch.randn(2, 2, 32, 16, dtype=torch.float64).unbind(0)

    def grads(pieces):
        memory.zero_grad()
        x = x0.clone().requires_grad_()
        out = memory(x)[0] if pieces is None else _stream(memory, x, pieces)  # None: one stateless call
        (out[:, -8:] * w[:, -8:]).sum().backward()
        return x.grad, {n: p.grad.clone() for n, p in memory.named_parameters()}

    ref_x, ref_p = grads(None)
    assert ref_x[:, :16].abs().max() > 1e-4  # the early tokens do reach the loss
    for pieces in ([32], [16, 16], [8, 8, 8, 8], [5, 11, 3, 13]):
        got_x, got_p = grads(pieces)
        torch.testing.assert_close(got_x, ref_x, atol=1e-12, rtol=0)
        for name, ref in ref_p.items():
            torch.testing.assert_close(got_p[name], ref, atol=1e-12 * max(1.0, ref.abs().max().item()), rtol=0)


def test_padding_never_writes_into_memory():
    torch.manual_seed(0)
    config = tiny_config("lmm", hidden_size=16)
    memory = randomize(TitansNeuralMemory(config, 0).double())
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 3, 16, dtype=torch.float64), x[:, :6], torch.randn(1, 2, 16, dtype=torch.float64), x[:, 6:]], 1)
    valid = torch.ones(1, 15, dtype=torch.bool)
    valid[:, :3] = False
    valid[:, 9:11] = False
    out, _ = memory(padded, valid)
    ref, _ = memory(x)
    torch.testing.assert_close(out[valid][None], ref, atol=1e-10, rtol=0)
    # without the mask the padding would be written, and the outputs would differ
    assert (memory(padded)[0][valid][None] - ref).abs().max() > 1e-4


@pytest.mark.parametrize("eta_bias", [0.0, 4.0])  # η = 0.5, 0.98
def test_saturated_gates_keep_the_memory_bounded(eta_bias):
    """D18: with θ at its maximum and η → 1 (what the outer training drifted to when the inner loop diverged), a
    chunk moves the memory by at most Σθ; a long stream of one repeated association stays bounded."""
    config = tiny_config("mag", memory_max_lr=0.25, memory_chunk_size=4, memory_conv_size=0)  # Σθ per chunk = 1
    memory = TitansNeuralMemory(config, layer_idx=0).double()
    with torch.no_grad():
        for w in memory.memory_weights:
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype) * 0.3)
        memory.gate_bias.copy_(torch.tensor([[20.0], [-20.0], [eta_bias]]).expand_as(memory.gate_bias))  # θ max, α ≈ 0
        memory.lr_proj.weight.zero_(), memory.forget_proj.weight.zero_(), memory.momentum_proj.weight.zero_()
    x = torch.randn(1, 1, config.hidden_size, dtype=torch.float64).expand(1, 256, -1)
    _, state = memory(x, return_state=True)
    start = max(w.norm().item() for w in memory.memory_weights)
    assert max(w.norm().item() for w in state.weights) < 3 * start


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_normalised_step_keeps_a_sharp_deep_memory_bounded(scale):
    """D19: a deep memory whose hidden activations are large (initial weights at `scale` times their init scale, as
    the outer training makes them) diverged with the plain gradient at θ·b = 0.8 (the MQAR blow-up: weights 4e13
    within 49 tokens); with each layer's step divided by 1 + ||layer input||² it stays bounded."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    heads, dim, hidden, T = 2, 16, 32, 512
    weights = [rand(1, heads, hidden, dim) * scale / dim**0.5, rand(1, heads, dim, hidden) * scale / hidden**0.5]
    k, v = F.normalize(rand(1, heads, T, dim), dim=-1), F.normalize(rand(1, heads, T, dim), dim=-1)
    k[:, :, T // 2 :] = k[:, :, : T // 2]  # the same keys again
    full = lambda value: torch.full((1, heads, T), value, dtype=torch.float64)  # noqa: E731
    lr, no_momentum, no_forgetting = full(0.2), full(1e-300), full(0.0)
    _, state, _ = _scan(weights, k, k, v, lr, no_momentum, no_forgetting, 4)
    start = max(w.abs().max().item() for w in weights)
    assert all(torch.isfinite(w).all() for w in state)
    assert max(w.abs().max().item() for w in state) < 3 * start


def test_warns_when_a_chunk_step_can_exceed_one(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            tiny_config(memory_max_lr=0.5, memory_chunk_size=4)
        assert "memory_max_lr * memory_chunk_size = 2" in caplog.text
        caplog.clear()
        with caplog.at_level("WARNING"):
            tiny_config(memory_max_lr=0.25, memory_chunk_size=4)
        assert "memory_max_lr" not in caplog.text
    finally:
        hf_logging.disable_propagation()


@pytest.mark.parametrize("path", ["function", "operator"])
@pytest.mark.parametrize("select", [None, (3, 0)])
def test_recomputing_backward_equals_autograd(select, path):
    """`_MemoryScanFunction` (saves chunk-boundary states, recomputes each chunk in the backward) and the scan operator
    that compiled graphs call (`_MEMORY_SCAN_OP`, which returns those states as outputs) against plain autograd
    through the same chunk loop, for every input, including the per-row selected end state."""
    from modeling_titans import _MEMORY_SCAN_OP, _scan_chunks, memory_chunk_coefficients

    def run(recompute):
        weights, q, k, v, lr, eta, alpha = _random_problem(2, 12, seed=7)
        gen = torch.Generator().manual_seed(3)
        momentum = [torch.randn(w.shape, generator=gen, dtype=w.dtype) * 0.1 for w in weights]
        initial = [w[:1].clone() + 0.1 for w in weights]
        leaves = [t.requires_grad_() for t in (*weights, *momentum, *initial, q, k, v, lr, eta.log(), (1 - alpha).log())]
        W, S, init, seq = leaves[0:2], leaves[2:4], leaves[4:6], leaves[6:]
        sel = None if select is None else torch.tensor(select)
        if recompute and path == "function":
            out, w_end, s_end = memory_scan(tuple(W), tuple(S), *seq, 4, "silu", sel, tuple(init))
        else:
            coefficients = memory_chunk_coefficients(*seq[3:], 4)
            tensors = (*W, *S, *init, *seq[:3], *coefficients)
            if recompute:  # outputs, end states, then the (n_chunks, B, H, d_out, d_in) chunk-start states
                out, *states = _MEMORY_SCAN_OP(list(tensors), sel, 2, 4, "silu", True)
                w_end, s_end = states[:2], states[2:4]
                assert [tuple(t.shape) for t in states[4:]] == [(3, *w.shape) for w in (*W, *S)]
            else:
                out, w_end, s_end, _ = _scan_chunks(tuple(W), tuple(S), tensors[6:], 4, "silu", sel, tuple(init))
        gen = torch.Generator().manual_seed(5)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (out, *w_end, *s_end))
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    for fast, slow in zip(run(True), run(False)):
        torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)


def test_scan_operator_passes_opcheck():
    """The scan operator's registration (schema, fake shapes and strides, autograd, AOT dispatch), by
    `torch.library.opcheck`, with and without per-row selected end states and with states kept or not."""
    from modeling_titans import _MEMORY_SCAN_OP, memory_chunk_coefficients

    weights, q, k, v, lr, eta, alpha = (t.float() if torch.is_tensor(t) else [w.float() for w in t] for t in _random_problem(2, 8))
    momentum = [w * 0.1 for w in weights]
    initial = [w[:1] + 0.1 for w in weights]
    tensors = [*weights, *momentum, *initial, q, k, v, *memory_chunk_coefficients(lr, eta.log(), (1 - alpha).log(), 4)]
    for select in (None, torch.tensor([2, 0])):
        for keep_states in (True, False):
            args = ([t.detach().requires_grad_(keep_states) for t in tensors], select, 2, 4, "silu", keep_states)
            torch.library.opcheck(_MEMORY_SCAN_OP.default, args)


@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunk_backward_equals_autograd(depth, activation, with_initial):
    """`memory_chunk_update_backward` (by hand, σ'' included) against autograd through `memory_chunk_update`, for
    every input: start weights and momentum (batch B), `initial` (batch 1, so its gradient sums over the batch),
    q, k, v and the coefficients of random gates."""
    from modeling_titans import memory_chunk_coefficients, memory_chunk_update, memory_chunk_update_backward

    batch, heads, b, dim = 3, 2, 4, 5
    weights, q, k, v, lr, eta, alpha = _random_problem(depth, b, batch=batch, heads=heads, dim=dim, seed=depth + 11)
    gen = torch.Generator().manual_seed(17)
    momentum = [torch.randn(w.shape, generator=gen, dtype=w.dtype) * 0.1 for w in weights]
    initial = [w[:1] + 0.1 * torch.randn(w[:1].shape, generator=gen, dtype=w.dtype) for w in weights]
    g, n_last, beta, f, m = memory_chunk_coefficients(lr * 5, eta.log(), (1 - alpha).log(), b)
    g = g.view(batch, heads, b, b)
    assert (g[..., torch.ones(b, b, dtype=torch.bool).tril()] > 0).all()  # each u_j reaches every M_i, i >= j
    inputs = (*weights, *momentum, *(initial if with_initial else ()), q, k, v, g, n_last, beta, f, m)

    leaves = [t.clone().requires_grad_() for t in inputs]
    W, S, init = leaves[:depth], leaves[depth : 2 * depth], leaves[2 * depth : -8] or None
    out, w_end, s_end = memory_chunk_update(tuple(W), tuple(S), *leaves[-8:], activation, init and tuple(init))
    upstream = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (out, *w_end, *s_end)]
    expected = torch.autograd.grad((out, *w_end, *s_end), leaves, upstream)

    grad_w, grad_s, grad_init, *grad_sequence = memory_chunk_update_backward(
        tuple(weights), tuple(momentum), *inputs[-8:], activation, tuple(initial) if with_initial else None,
        upstream[0], tuple(upstream[1 : 1 + depth]), tuple(upstream[1 + depth :]),
    )  # fmt: skip
    assert (grad_init is None) == (not with_initial)
    for got, want in zip((*grad_w, *grad_s, *(grad_init or ()), *grad_sequence), expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("ablation", [{}, {"memory_use_momentum": False}, {"memory_use_forgetting": False}])
@pytest.mark.parametrize("prefix", [1, 3, 4, 6])
def test_one_token_steps_equal_the_chunk_form(prefix, ablation):
    """Decoding steps use the token recurrence (O(|M|) per token) from the state the chunk form left; the outputs of a
    whole stream must not depend on it. Row 1 has 2 left-padding tokens, so the rows sit at different chunk phases."""
    memory = randomize(TitansNeuralMemory(tiny_config("mag", **ablation), layer_idx=0).double(), scale=0.3)
    x = torch.randn(2, 20, memory.config.hidden_size, dtype=torch.float64)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :2] = False
    full, _ = memory(x, valid)
    out, state = memory(x[:, :prefix], valid[:, :prefix], return_state=True)
    outputs = [out]
    for t in range(prefix, 20):
        out, state = memory(x[:, t : t + 1], valid[:, t : t + 1], state=state, return_state=True)
        outputs.append(out)
    assert state.current_weights is not None  # the recurrence was used
    stream = torch.cat(outputs, 1)
    torch.testing.assert_close(stream[valid], full[valid], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", [1, 4])
def test_short_conv_equals_conv1d(kernel):
    """The shifted-sum ShortConv (channels last) against F.conv1d, its gradients by autograd's numerical check, and
    in bf16 against the fp32 result."""
    from modeling_titans import _CausalDepthwiseConv

    gen = torch.Generator().manual_seed(0)
    padded = torch.randn(2, 9 + kernel - 1, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(kernel, 6, generator=gen, dtype=torch.float64, requires_grad=True)  # taps (K, C)
    expected = F.conv1d(padded.transpose(1, 2), weight.t().unsqueeze(1), groups=6).transpose(1, 2)
    out = _CausalDepthwiseConv.apply(padded, weight)
    assert out.is_contiguous() and torch.allclose(out, expected, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(_CausalDepthwiseConv.apply, (padded, weight))
    # with only one of the two inputs requiring a gradient
    assert torch.autograd.gradcheck(_CausalDepthwiseConv.apply, (padded.detach().requires_grad_(), weight.detach()))
    assert torch.autograd.gradcheck(_CausalDepthwiseConv.apply, (padded.detach(), weight.detach().requires_grad_()))
    half = _CausalDepthwiseConv.apply(padded.detach().bfloat16(), weight.detach().bfloat16())
    assert half.dtype == torch.bfloat16
    exact = F.conv1d(padded.detach().bfloat16().double().transpose(1, 2),
                     weight.detach().bfloat16().double().t().unsqueeze(1), groups=6).transpose(1, 2)  # fmt: skip
    assert torch.allclose(half.double(), exact, rtol=8e-3, atol=1e-2)  # one bf16 rounding of an fp32 sum


@pytest.mark.parametrize("value_norm", [True, False])
def test_qkv_are_conv_silu_and_per_head_norms(value_norm):
    """q, k, v = SiLU(causal depthwise conv of x W) per head, q and k (and v with memory_value_norm) of unit norm,
    written out with an explicit conv over zero-padded time."""
    memory = randomize(TitansNeuralMemory(tiny_config("mag", memory_value_norm=value_norm), 0))
    x = torch.randn(2, 9, memory.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k, v, _ = memory._qkv(x, None)
        projected = torch.cat([memory.q_proj(x), memory.k_proj(x), memory.v_proj(x)], dim=-1)
        size = memory.conv_weight.shape[1]
        padded = F.pad(projected, (0, 0, size - 1, 0))
        conv = sum(memory.conv_weight[:, j] * padded[:, j : j + x.shape[1]] for j in range(size))
        heads = F.silu(conv).view(2, 9, 3, memory.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        want = [F.normalize(heads[0], dim=-1), F.normalize(heads[1], dim=-1)]
        want.append(F.normalize(heads[2], dim=-1) if value_norm else heads[2])
    for got, expected in zip((q, k, v), want):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
