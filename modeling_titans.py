# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""PyTorch Titans: a causal LM whose layers carry a neural long-term memory that keeps learning at test time.

Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663. Equation numbers in the
comments refer to that paper (v1). Every interpretation choice is listed once in `model_card.md`.

Layout follows `modeling_llama.py`: norm -> rotary -> MLP -> neural memory (+ its cache state) -> attention ->
decoder layer -> cache -> PreTrainedModel -> Model -> ForCausalLM.
"""

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import sys
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, add_offsets_to_mask_function
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging


try:  # loaded as Hub remote code: the module lives in transformers_modules.<repo>.<hash>
    from .configuration_titans import TitansConfig
except ImportError:  # installed top-level py_module, or run from the repository root
    from configuration_titans import TitansConfig


logger = logging.get_logger(__name__)


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS(x) over the last dim, as `F.rms_norm` computes it."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dim with a hand-written backward, for fp32 training on CPU. There `F.rms_norm` is
    composite: autograd records six nodes (pow, mean, add, rsqrt, two products) and keeps the normalised x beside x.
    Here one node keeps x and 1/rms only: one activation-sized tensor less per norm, and fewer small heap blocks
    between the tensors (MAC builds its norms per segment). Same forward arithmetic as `F.rms_norm`."""

    generate_vmap_rule = True  # torch.func transforms (grad, vmap: per-sample gradients) work as with F.rms_norm

    @staticmethod
    def forward(x, weight, eps):
        rstd = _rstd(x, eps)
        return x * rstd * weight, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _):
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd
        grad_normed = grad * weight
        # d/dx of x·r with r = (mean(x²) + eps)^(-1/2): r·(g - x̂·mean(g·x̂)) per row
        grad_x = (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)) * rstd
        grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if hidden_states.dtype == weight.dtype == torch.float32:
        if (
            hidden_states.device.type == "cpu"  # (CUDA's F.rms_norm is a fused kernel, forward and backward)
            and torch.is_grad_enabled()
            and (hidden_states.requires_grad or weight.requires_grad)
            and not torch.compiler.is_compiling()  # (inductor fuses the composite itself)
        ):
            return _RMSNormFunction.apply(hidden_states, weight, eps)[0]
        # the same arithmetic in one call, bitwise equal: 6 dispatches fewer per norm in decoding
        return F.rms_norm(hidden_states, weight.shape, weight, eps)
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    return weight * (hidden_states * _rstd(hidden_states, eps)).to(input_dtype)


class TitansRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class TitansRotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.config = config
        self.rope_type = "default"
        inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: TitansConfig, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (x * cos) + (rotate_half(x) * sin)


# Whole-sequence temporaries made long inputs slower per token on CPU: at 4 x 8,192 tokens (anchor dims) each is
# >= 32 MiB, which glibc always serves with fresh mmap'd pages (page faults: 30 % of a training step), and even
# without the faults (heap only) the step was no faster. Work that is independent per position (or per memory
# chunk) therefore runs on pieces of at most `_PIECE_ELEMENTS` elements, whose temporaries stay small and reused;
# inputs up to 4 x 1,024 tokens of width 256 are a single piece, i.e. the plain call.
_PIECE_ELEMENTS = 1 << 20


def _piece_length(elements_per_step: int, device: torch.device, multiple: int = 1) -> int:
    """Time steps per piece: at most `_PIECE_ELEMENTS` elements, a positive multiple of `multiple` (chunk, window).
    Off the CPU, one piece: the pieces answer glibc's heap, and on an accelerator they would only cut the work into
    small launches (at hidden 1,024 and batch 8, the attention and MLP of 128 tokens at a time)."""
    if device.type != "cpu":
        return sys.maxsize
    return max(_PIECE_ELEMENTS // (elements_per_step * multiple), 1) * multiple


def _position_wise(fn, *xs):
    """fn(*xs) for a fn that treats each position of its (B, T, ...) inputs on its own, applied to time pieces."""
    size = _piece_length(xs[0][:, :1].numel(), xs[0].device)
    if xs[0].shape[1] <= size:
        return fn(*xs)
    return torch.cat([fn(*piece) for piece in zip(*(x.split(size, dim=1) for x in xs))], dim=1)


# Training on long CPU inputs fragments glibc's heap: many tensors kept for the backward are 256-512 KB (MAC: a
# segment's activations, a memory state), allocated between temporaries of the same sizes, and the heap cannot hand the
# holes between them back. At 4 x 4,096 tokens (anchor dims) MAC held ~1.1 GiB more than was alive
# (results/speed_log.md, "Why MAC missed the RSS target"). Returning the free heap pages to the OS (malloc_trim) after
# each decoder layer, and in MAC every `_TRIM_SEGMENTS` segments, removes that. It costs page faults when the pages are
# reused: the first trim of a step hands back the previous step's freed heap too, so a step faults in about its whole
# peak again. It therefore runs only on inputs of at least `_TRIM_MIN_ELEMENTS` elements, where the holes matter.
# Measured at anchor dims, 4 x 4,096, 1 thread (results/benchmark_trim_4096_*_amd.json, speed_log.md "What the heap
# trimming costs"): eager MAC peaks at 2.7-2.8 GiB with it and 3.4 without, and runs 1.14-1.17x as fast without;
# compiled MAC 2.43 vs 2.91 GiB, 1.03-1.17x; MAG saves 0.1-0.3 GiB at 1.02-1.12x. The 3 GiB bound wins by default;
# where memory is plentiful, TITANS_MALLOC_TRIM=0 turns it off.
_TRIM_SEGMENTS, _TRIM_MIN_ELEMENTS = 16, 1 << 22


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only; elsewhere the allocator is left alone
    except (OSError, AttributeError):
        return None


def _heap_trimmer(x: torch.Tensor) -> Callable[[int], int] | None:
    """malloc_trim where it pays: training (autograd keeps the tensors) on CPU, large inputs, glibc."""
    if os.environ.get("TITANS_MALLOC_TRIM", "1") == "0" or x.device.type != "cpu" or not torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling():  # a foreign call inside a compiled model would only break its graph
        return None
    return _malloc_trim() if x.numel() >= _TRIM_MIN_ELEMENTS else None


class TitansMLP(nn.Module):
    def __init__(self, config: TitansConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------------------------
# Neural long-term memory: pure functions over one state (chunk-parallel form; decoding reuses it on the buffer).
# ----------------------------------------------------------------------------------------------------------------

def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _silu_grad2(z):
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _tanh_grad2(z):
    t = torch.tanh(z)
    return -2 * t * (1 - t * t)


# activation σ, σ' (deltas of Eq. 12) and σ'' (the backward of the deltas, `memory_chunk_update_backward`)
_MEMORY_ACTIVATIONS = {
    "silu": (F.silu, _silu_grad, _silu_grad2),
    "gelu": (
        lambda z: F.gelu(z),
        lambda z: 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327,
        lambda z: torch.exp(-0.5 * z * z) * 0.3989422804014327 * (2 - z * z),
    ),
    "tanh": (torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, _tanh_grad2),
}


def _autocast_off() -> contextlib.AbstractContextManager:
    """Mixed precision stops at the memory: its inner optimisation (Eq. 13-16) runs in the state dtype (fp32), as
    `TitansNeuralMemory.state_dtype` promises, also under `torch.autocast` (Trainer's --bf16/--fp16). Autocast would
    run the inner matmuls in half precision, and that rounding accumulates over every chunk of a stream (model card D16)."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _full_precision(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _autocast_off():
            return fn(*args, **kwargs)

    return wrapper


@_full_precision
def memory_apply(weights: tuple[torch.Tensor, ...], x: torch.Tensor, activation: str) -> torch.Tensor:
    """Retrieval y = M*(x) (Eq. 15): a forward pass of the memory MLP without changing its weights.

    `weights[l]` has shape (B, H, d_out, d_in); x is (B, H, T, d). Deep memories (L_M >= 2) carry a residual
    connection, M(x) = x + W_L σ(... σ(W_1 x)), as in the authors' follow-up work (model card, decision D3).
    """
    act = _MEMORY_ACTIVATIONS[activation][0]
    a = x
    for layer, weight in enumerate(weights):
        a = a @ weight.transpose(-1, -2)
        if layer < len(weights) - 1:
            a = act(a)
    return a + x if len(weights) > 1 else a


# Decay products of many η_t, 1 - α_t < 1 fall into float32 subnormals, which make every CPU op that touches them
# 10-100x slower. Coefficients below these bounds are dropped (relative effect < 1e-17, far below fp32 precision).
_MIN_LOG_COEFF, _MIN_COEFF = -40.0, 1e-20


@_full_precision
def memory_gradient_factors(weights: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor, activation: str):
    """Per-token gradient of ℓ = ||M(k) - v||² (Eq. 12) w.r.t. each memory layer, in factored form.

    Forward at the given weights on the keys, then the analytic backward: the gradient of token j w.r.t. layer l is
    the outer product deltas[l][j] ⊗ inputs[l][j], here already divided by 1 + ||inputs[l][j]||² (normalised step,
    model card D19). Autograd-free, so it also runs inside `generate()` (no_grad).
    """
    inputs, deltas, *_ = _gradient_factors(weights, k, v, activation)
    return inputs, deltas


def _gradient_factors(weights, k, v, activation):
    """`memory_gradient_factors`, also returning what its own backward needs: the pre-activations z_l = a_l W_lᵀ, the
    back-propagated δ_{l+1} W_{l+1}, the slopes σ'(z_l) (l < L - 1) whose product is δ_l, the deltas before the
    normalisation and its factors 1 / (1 + ||a_l||²)."""
    act, act_grad, _ = _MEMORY_ACTIVATIONS[activation]
    depth = len(weights)
    inputs, pre_acts = [], []
    a = k
    for layer, weight in enumerate(weights):
        inputs.append(a)
        z = a @ weight.transpose(-1, -2)
        pre_acts.append(z)
        a = act(z) if layer < depth - 1 else z
    prediction = a + k if depth > 1 else a
    delta = 2.0 * (prediction - v)
    raw, carried, slopes = [None] * depth, [None] * (depth - 1), [None] * (depth - 1)
    for layer in reversed(range(depth)):
        raw[layer] = delta
        if layer > 0:
            carried[layer - 1], slopes[layer - 1] = delta @ weights[layer], act_grad(pre_acts[layer - 1])
            delta = carried[layer - 1] * slopes[layer - 1]
    # Normalised-LMS step (model card D19): layer l's gradient δ_l a_lᵀ has curvature ∝ ‖a_l‖² along itself, and
    # ‖a_l‖ = ‖σ(W_{l-1} a_{l-1})‖ grows with the memory's own weights; dividing by 1 + ‖a_l‖² keeps θ a step size
    # relative to that curvature, so the inner loop cannot run away once the outer training sharpens the memory.
    scales = [1.0 / (1.0 + (a * a).sum(-1, keepdim=True)) for a in inputs]
    deltas = [d * r for d, r in zip(raw, scales)]
    return inputs, deltas, pre_acts, carried, slopes, raw, scales


def _exp_nonpositive(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """exp(x) for x <= 0, exactly 0 below e^-40 and outside `keep`."""
    drop = x < _MIN_LOG_COEFF
    if keep is not None:
        drop = drop | ~keep
    return torch.exp(x.masked_fill(drop, float("-inf")))


def _flush_tiny(x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(x.abs() < _MIN_COEFF, 0.0)


def memory_chunk_coefficients(lr: torch.Tensor, log_eta: torch.Tensor, log_keep: torch.Tensor, chunk_size: int):
    """Closed-form momentum / decay coefficients of every chunk at once (paper §3.2, Eq. 16-18).

    Unrolling S_i = η_i S_{i-1} - θ_i u_i (Eq. 10/14) and M_i = (1 - α_i) M_{i-1} + S_i (Eq. 13) over one chunk gives,
    with β_i = Π(1-α), m_i = Π η, n_ij = θ_j Π_{j<k<=i} η_k (products from the chunk start):

        S_i = m_i S_0 - Σ_j n_ij u_j,     M_i = β_i M_0 + f_i S_0 - Σ_j G_ij u_j,
        f_i = Σ_{k<=i} (β_i/β_k) m_k,     G = tril(β_i/β_k) @ N.

    They depend on the gates only, so they are computed for all chunks in one batch, in log space (every exponent is
    <= 0). Inputs (B, H, T) with T a multiple of `chunk_size`. Returns G as (B, H, T, b) (row i of its chunk's
    matrix), and per token (B, H, T): n_{b,j} (the last row of N), β_i, f_i and m_i.
    """
    # chunks are independent: long inputs go by pieces of whole chunks, so that the (B, H, T, b) temporaries stay
    # small (see `_PIECE_ELEMENTS`)
    size = _piece_length(lr[..., :1].numel() * chunk_size, lr.device, chunk_size)
    if lr.shape[-1] > size:
        pieces = zip(*(t.split(size, dim=-1) for t in (lr, log_eta, log_keep)))
        g, *per_token = zip(*(memory_chunk_coefficients(*piece, chunk_size) for piece in pieces))
        return torch.cat(g, dim=-2), *(torch.cat(t, dim=-1) for t in per_token)
    shape = (*lr.shape[:-1], -1, chunk_size)
    lr, log_eta, log_keep = lr.reshape(shape), log_eta.reshape(shape), log_keep.reshape(shape)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=lr.device).tril()
    cum_eta, cum_keep = log_eta.cumsum(-1), log_keep.cumsum(-1)
    decay = _exp_nonpositive(cum_keep[..., :, None] - cum_keep[..., None, :], causal)
    carry = _exp_nonpositive(cum_eta[..., :, None] - cum_eta[..., None, :], causal)
    n = _flush_tiny(carry * lr[..., None, :])
    g = _flush_tiny(decay @ n)
    m = _exp_nonpositive(cum_eta)
    f = _flush_tiny((decay @ m[..., None]).squeeze(-1))
    beta = _exp_nonpositive(cum_keep)
    flat = lambda t: t.flatten(-2)  # noqa: E731
    return g.flatten(-3, -2), flat(n[..., -1, :]), flat(beta), flat(f), flat(m)


def memory_chunk_update(
    weights: tuple[torch.Tensor, ...],
    momentum: tuple[torch.Tensor, ...],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    n_last: torch.Tensor,
    beta: torch.Tensor,
    f: torch.Tensor,
    m: torch.Tensor,
    activation: str,
    initial: tuple[torch.Tensor, ...] | None = None,
):
    """One chunk of the chunk-parallel memory (paper §3.2, Eq. 16-18), exact per token.

    Inside the chunk every gradient u_j = ∇ℓ(M_0; k_j, v_j) is taken at the chunk-start weights M_0 (Eq. 16), with the
    associative loss ℓ = ||M(k) - v||² (Eq. 12); the coefficients g, n_last, β, f, m come from
    `memory_chunk_coefficients` (shapes (B, H, b, b) and (B, H, b)).

    Forgetting pulls the memory back to its learned initial weights `initial` (M_init) rather than to zero
    (model card D7): M_i = (1 - α_i) M_{i-1} + α_i M_init + S_i, which adds (1 - β_i) M_init to M_i. Without it, a
    deep memory without biases collapses to M = 0, where its gradient vanishes, within a few hundred tokens.

    Retrieval with the per-token weights M_i uses the dual form (each u_j is an outer product δ_j a_jᵀ per layer),
    so no per-token weight copy is ever made. Shapes: q, k, v (B, H, b, d).
    Returns (outputs (B, H, b, d), weights at the chunk end, momentum at the chunk end).
    """
    act = _MEMORY_ACTIVATIONS[activation][0]
    depth = len(weights)
    inputs, deltas = memory_gradient_factors(weights, k, v, activation)

    # per-token retrieval y_i = M_i(q_i) by the dual form
    a = q
    for layer in range(depth):
        z = (
            beta[..., None] * (a @ weights[layer].transpose(-1, -2))
            + f[..., None] * (a @ momentum[layer].transpose(-1, -2))
            + (0.0 if initial is None else (1 - beta[..., None]) * (a @ initial[layer].transpose(-1, -2)))
            - (g * (a @ inputs[layer].transpose(-1, -2))) @ deltas[layer]
        )
        a = act(z) if layer < depth - 1 else z
    outputs = a + q if depth > 1 else a

    # states at the chunk end
    g_last, n_last = g[..., -1, :, None], n_last[..., :, None]
    beta_last, f_last, m_last = beta[..., -1, None, None], f[..., -1, None, None], m[..., -1, None, None]
    new_weights, new_momentum = [], []
    for layer in range(depth):
        new = beta_last * weights[layer] + f_last * momentum[layer] - (deltas[layer] * g_last).transpose(-1, -2) @ inputs[layer]
        new_weights.append(new if initial is None else new + (1 - beta_last) * initial[layer])
        new_momentum.append(m_last * momentum[layer] - (deltas[layer] * n_last).transpose(-1, -2) @ inputs[layer])
    return outputs, tuple(new_weights), tuple(new_momentum)


def memory_chunk_update_backward(
    weights: tuple[torch.Tensor, ...],
    momentum: tuple[torch.Tensor, ...],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    n_last: torch.Tensor,
    beta: torch.Tensor,
    f: torch.Tensor,
    m: torch.Tensor,
    activation: str,
    initial: tuple[torch.Tensor, ...] | None,
    grad_out: torch.Tensor,
    grad_weights: tuple[torch.Tensor, ...],
    grad_momentum: tuple[torch.Tensor, ...],
):
    """Backward of `memory_chunk_update` by hand: no autograd graph per chunk, only the chunk's own intermediates.

    Recomputes the forward on the keys (`memory_gradient_factors`) and the dual-form retrieval, then goes back through
    the chunk-end states, the retrieval and the deltas (which need σ''). Given the gradients of the outputs and of the
    chunk-end weights and momentum, returns those of (weights, momentum, initial or None, q, k, v, g, n_last, β, f, m),
    each of its input's shape (`initial`, batch 1, summed over the batch).
    """
    act, act_grad, act_grad2 = _MEMORY_ACTIVATIONS[activation]
    depth, b = len(weights), q.shape[-2]
    t = lambda x: x.transpose(-1, -2)  # noqa: E731
    inputs, deltas, pre_acts, carried, slopes, raw, scales = _gradient_factors(weights, k, v, activation)
    beta_, f_ = beta[..., None], f[..., None]

    # chunk-end states: W' = β_b W + f_b S - (δ ∘ g_b)ᵀ a + (1 - β_b) M_init,  S' = m_b S - (δ ∘ n)ᵀ a
    g_last, n_col = g[..., -1, :, None], n_last[..., :, None]
    beta_last, f_last, m_last = beta[..., -1, None, None], f[..., -1, None, None], m[..., -1, None, None]
    grad_w, grad_s, grad_init, grad_a, grad_delta, kept = [], [], [], [], [], []
    grad_beta_last = grad_f_last = grad_m_last = grad_g_last = grad_n_last = 0.0
    for layer in range(depth):
        dw, ds = grad_weights[layer], grad_momentum[layer]
        grad_w.append(beta_last * dw)
        grad_s.append(f_last * dw + m_last * ds)
        kept.append(weights[layer] if initial is None else weights[layer] - initial[layer])  # what β scales
        grad_beta_last = grad_beta_last + (dw * kept[layer]).sum((-1, -2))
        grad_f_last = grad_f_last + (dw * momentum[layer]).sum((-1, -2))
        grad_m_last = grad_m_last + (ds * momentum[layer]).sum((-1, -2))
        if initial is not None:
            grad_init.append((1 - beta_last) * dw)
        a_dw, a_ds = inputs[layer] @ t(dw), inputs[layer] @ t(ds)  # (B, H, b, d_out)
        grad_delta.append(-g_last * a_dw - n_col * a_ds)
        grad_g_last = grad_g_last - (deltas[layer] * a_dw).sum(-1)
        grad_n_last = grad_n_last - (deltas[layer] * a_ds).sum(-1)
        grad_a.append((deltas[layer] * -g_last) @ dw - (deltas[layer] * n_col) @ ds)

    # retrieval z_l = β h W_lᵀ + f h S_lᵀ + (1 - β) h M_initᵀ - (g ∘ h a_lᵀ) δ_l: recompute h_l, h a_lᵀ and, below
    # the last layer (whose output is not needed), σ'(z_l)
    hs, scores, retrieval_slopes = [q], [], []
    for layer in range(depth):
        h = hs[layer]
        scores.append(h @ t(inputs[layer]))
        if layer == depth - 1:
            break
        z = beta_ * (h @ t(kept[layer])) + f_ * (h @ t(momentum[layer])) - (g * scores[layer]) @ deltas[layer]
        if initial is not None:  # β W + (1 - β) M_init = β (W - M_init) + M_init
            z = z + h @ t(initial[layer])
        hs.append(act(z))
        retrieval_slopes.append(act_grad(z))
    # ... and back through it, from the output (with the residual of deep memories) to q
    grad_q = grad_out if depth > 1 else 0.0
    grad_beta = grad_f = grad_g = 0.0
    grad_h = grad_out
    for layer in reversed(range(depth)):
        h = hs[layer]
        dz = grad_h if layer == depth - 1 else grad_h * retrieval_slopes[layer]
        back_kept, back_s = dz @ kept[layer], dz @ momentum[layer]
        grad_h = beta_ * back_kept + f_ * back_s
        grad_beta = grad_beta + (h * back_kept).sum(-1)
        grad_f = grad_f + (h * back_s).sum(-1)
        grad_w[layer] = grad_w[layer] + t(beta_ * dz) @ h
        grad_s[layer] = grad_s[layer] + t(f_ * dz) @ h
        if initial is not None:
            grad_h = grad_h + dz @ initial[layer]
            grad_init[layer] = grad_init[layer] + t((1 - beta_) * dz) @ h
        grad_score = -(dz @ t(deltas[layer]))
        grad_delta[layer] = grad_delta[layer] - t(g * scores[layer]) @ dz
        grad_g = grad_g + scores[layer] * grad_score
        grad_score = g * grad_score
        grad_h = grad_h + grad_score @ inputs[layer]
        grad_a[layer] = grad_a[layer] + t(grad_score) @ h
    grad_q = grad_q + grad_h

    # normalised deltas δ_l r_l, r_l = 1 / (1 + ||a_l||²): back to the raw δ_l and, through r_l, to a_l
    for layer in range(depth):
        along = (grad_delta[layer] * raw[layer]).sum(-1, keepdim=True)
        grad_a[layer] = grad_a[layer] - 2.0 * along * scales[layer] ** 2 * inputs[layer]
        grad_delta[layer] = grad_delta[layer] * scales[layer]
    # deltas δ_{l-1} = (δ_l W_l) ∘ σ'(z_{l-1}) (memory_gradient_factors), from δ_0 up; δ_{L-1} = 2 (M(k) - v)
    grad_pre = [0.0] * depth
    for layer in range(1, depth):
        grad_carried = grad_delta[layer - 1] * slopes[layer - 1]
        grad_pre[layer - 1] = grad_delta[layer - 1] * carried[layer - 1] * act_grad2(pre_acts[layer - 1])
        grad_delta[layer] = grad_delta[layer] + grad_carried @ t(weights[layer])
        grad_w[layer] = grad_w[layer] + t(raw[layer]) @ grad_carried
    grad_prediction = 2.0 * grad_delta[-1]
    grad_v = -grad_prediction
    # forward on the keys a_{l+1} = σ(a_l W_lᵀ), M(k) = a_L (+ k for deep memories)
    grad_k = grad_prediction if depth > 1 else 0.0
    grad_a_next = grad_prediction
    for layer in reversed(range(depth)):
        dz = grad_a_next if layer == depth - 1 else grad_a_next * slopes[layer] + grad_pre[layer]
        grad_w[layer] = grad_w[layer] + t(dz) @ inputs[layer]
        grad_a_next = grad_a[layer] + dz @ weights[layer]
    grad_k = grad_k + grad_a_next

    # terms of the last token only (β_b, f_b, m_b, row b of g) join the per-token ones
    last = lambda x: F.pad(x[..., None], (b - 1, 0))  # noqa: E731
    return (
        tuple(gw.sum_to_size(w.shape) for gw, w in zip(grad_w, weights)),
        tuple(gs.sum_to_size(s.shape) for gs, s in zip(grad_s, momentum)),
        None if initial is None else tuple(gi.sum_to_size(i.shape) for gi, i in zip(grad_init, initial)),
        grad_q,
        grad_k,
        grad_v,
        grad_g + F.pad(grad_g_last[..., None, :], (0, 0, b - 1, 0)),
        grad_n_last,
        grad_beta + last(grad_beta_last),
        grad_f + last(grad_f_last),
        last(grad_m_last),
    )


@_full_precision
def memory_scan(
    weights, momentum, q, k, v, lr, log_eta, log_keep, chunk_size, activation, select_chunk=None, initial=None
):
    """Chunk-parallel memory over a sequence whose length is a multiple of `chunk_size`.

    The inter-chunk recurrence is sequential (the gradient of chunk c needs M at its start); inside a chunk all is
    matmuls (`memory_chunk_update`). If `select_chunk` (B,) is given, the returned state of row r is the one after
    `select_chunk[r]` chunks (rows may hold different numbers of real tokens); otherwise the final state.

    With autograd on, `_MemoryScanFunction` keeps only the chunk-boundary states for the backward and recomputes
    one chunk at a time there: the per-token activations of all chunks are never alive at once. Traced by
    torch.compile, the scan is one operator of the graph (`_MEMORY_SCAN_OP`) that does the same.
    """
    initial = tuple(initial) if initial is not None else ()
    # the gates arrive as strided views of several layouts (a transposed stack, a concatenation with a cache's open
    # chunk, either cut to the real length): made dense, the compiled coefficients see one layout (under
    # TITANS_MEMORY_KERNEL=compile each stride pattern was one more compile, ~17 s on CPU)
    lr, log_eta, log_keep = (t.contiguous() for t in (lr, log_eta, log_keep))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (lr, log_eta, log_keep)):
        # b×b coefficients of every chunk: cheap to recompute in the backward, large to store
        coefficients = checkpoint(
            _maybe_compiled(memory_chunk_coefficients), lr, log_eta, log_keep, chunk_size, use_reentrant=False
        )
    else:
        coefficients = _maybe_compiled(memory_chunk_coefficients)(lr, log_eta, log_keep, chunk_size)
    tensors = (*weights, *momentum, *initial, q, k, v, *coefficients)
    depth, needs_grad = len(weights), torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():  # one node of the captured graph at any length (`_MEMORY_SCAN_OP`)
        out, *state = _MEMORY_SCAN_OP(list(tensors), select_chunk, depth, chunk_size, activation, needs_grad)
        return out, tuple(state[:depth]), tuple(state[depth : 2 * depth])
    if needs_grad:
        out, *state = _MemoryScanFunction.apply(chunk_size, activation, depth, select_chunk, *tensors)
        return out, tuple(state[:depth]), tuple(state[depth:])
    out, new_w, new_s, _, _ = _scan_forward(tensors, depth, chunk_size, activation, select_chunk, keep_states=False)
    return out, new_w, new_s


_SEQUENCE_INPUTS = 8  # q, k, v, g, n_last, beta, f, m


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """x in the row-major layout, size-1 dims included (`is_contiguous` ignores their strides; graph guards do not)."""
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= size
    return x if x.stride() == tuple(reversed(strides)) else x.clone(memory_format=torch.contiguous_format)


def _detached(tensors):
    return tuple(t.detach() for t in tensors)


def _chunks(sequence, chunk_size, canonical=False):
    # Split once: per-chunk slicing would make the backward write a full-length zero gradient per chunk.
    q, k, v, g, *per_token = sequence
    pieces = list(
        zip(
            *(t.split(chunk_size, dim=-2) for t in (q, k, v, g)),
            *(t.split(chunk_size, dim=-1) for t in per_token),
        )
    )
    if canonical:  # for the compiled chunk functions, whose graphs guard on strides: a slice takes them from the
        # whole length, so every new length (MAC: every segment length) compiled the same chunk again (up to 5 graphs
        # in one MAC step of a left-padded batch). Row-major copies of one chunk cost little beside its products.
        pieces = [tuple(map(_contiguous, piece)) for piece in pieces]
    return pieces


def _holds_everywhere(condition: torch.Tensor) -> bool:
    """bool(condition.all()), to take a cheaper special case (no padding, rows at the same phase) in eager mode. Traced
    by torch.compile it is False: the general path, rather than a host read that would cut the graph in two."""
    return not torch.compiler.is_compiling() and bool(condition.all())


def _select(select_chunk, c, new, old):
    """Rows whose state is the one after `c` chunks take `new`."""
    take = select_chunk == c
    if not torch.compiler.is_compiling():  # (a traced graph always selects: no data-dependent branch)
        if bool(take.all()):
            return tuple(new)
        if not bool(take.any()):
            return tuple(old)
    take = take.view(-1, *([1] * (new[0].dim() - 1)))
    return tuple(torch.where(take, n, o) for n, o in zip(new, old))


@functools.cache
def _compiled_chunk_functions():
    # Inductor fuses the elementwise work of a chunk (C++ on CPU, Triton on GPU). Every chunk has the same shapes, so
    # one graph is compiled on first use (~30 s on CPU at the anchor size) and serves all chunks.
    return torch.compile(memory_chunk_update), torch.compile(memory_chunk_update_backward)


@functools.cache
def _compiled_decode_update():
    # One graph for the whole memory side of a decoding step (projections, gates, update, read, output): in eager
    # mode its many small ops cost more in dispatch than in arithmetic. All layers share the graph (their parameters
    # are inputs); compiled on the first step, ~5-20 s on CPU.
    return torch.compile(TitansNeuralMemory._decode_update, dynamic=False)


@functools.cache
def _compiled_decoding_step():
    # All layers of a steady one-token decoding step in one graph (`TitansModel._steady_decoding`): eager, each step
    # dispatches hundreds of tiny ops; compiled separately, each memory step pays the guard and launch overhead.
    return torch.compile(TitansModel._decoding_step, dynamic=False)


def _use_compiled_memory() -> bool:
    """TITANS_MEMORY_KERNEL=compile, and not inside a model that is itself being compiled (dynamo traces the eager
    functions there)."""
    return _memory_kernel_mode() == "compile" and not torch.compiler.is_compiling()


@functools.cache
def _compiled_function(fn):
    # Shapes vary with the input length (MAC: one segment per call, so one shape): the first call compiles for its
    # shapes, a second shape recompiles once with dynamic sizes (torch.compile's automatic dynamic shapes).
    return torch.compile(fn)


def _maybe_compiled(fn, tokens: int | None = None):
    """fn torch.compile'd under `_use_compiled_memory` in training (inductor fuses its elementwise work), else fn.
    Without autograd (a prefill, once per prompt length) the graphs would be compiled again for a gain of a few
    milliseconds, before the decoding graph's own compile. A call on one token (`tokens`, the input's length) stays
    eager too: dynamo specialises a length of 1 (and the q/k/v function gets the conv taps in their decoding layout
    there), so MAC's one-token slices of a padded batch compiled each function a third time, forward and backward
    (13 s of inductor's time in `test_compiled_chunk_scan_matches_eager[mac]`), for calls that are rare and small."""
    return _compiled_function(fn) if _use_compiled_memory() and torch.is_grad_enabled() and tokens != 1 else fn


def _chunk_functions():
    """(forward, backward) of one chunk: torch.compile'd under `_use_compiled_memory`, else the eager reference."""
    if _use_compiled_memory():
        return _compiled_chunk_functions()
    return memory_chunk_update, memory_chunk_update_backward


def _scan_chunks(weights, momentum, sequence, chunk_size, activation, select_chunk, initial, keep_states=False):
    update = _chunk_functions()[0]
    outputs, boundaries = [], []
    selected_w, selected_s = weights, momentum
    for c, piece in enumerate(_chunks(sequence, chunk_size, canonical=_use_compiled_memory())):
        if keep_states:
            boundaries.append((weights, momentum))
        out, weights, momentum = update(weights, momentum, *piece, activation, initial)
        outputs.append(out)
        if select_chunk is not None:
            selected_w = _select(select_chunk, c + 1, weights, selected_w)
            selected_s = _select(select_chunk, c + 1, momentum, selected_s)
    if select_chunk is None:
        selected_w, selected_s = weights, momentum
    return torch.cat(outputs, dim=-2), selected_w, selected_s, boundaries


def _scan_forward(tensors, depth, chunk_size, activation, select_chunk, keep_states):
    """The scan without autograd: (outputs, final weights, final momentum, boundaries, fused). With `keep_states`,
    `boundaries` are the states at every chunk start: the fused kernels' (n_chunks + 1)-slot buffers per layer as
    (weights, momentum) when they ran (`fused`), else a list of (weights, momentum) per chunk."""
    weights, momentum = tensors[:depth], tensors[depth : 2 * depth]
    initial = tensors[2 * depth : -_SEQUENCE_INPUTS] or None
    sequence = tensors[-_SEQUENCE_INPUTS:]
    if _use_triton_scan(tensors, depth, chunk_size, activation, select_chunk):  # (section below)
        try:
            out, new_w, new_s, boundaries = _triton_scan_forward(
                weights, momentum, initial, sequence, chunk_size, activation, keep_states
            )
            return out, new_w, new_s, boundaries, True
        except Exception as error:
            _triton_failed(_triton_key(tensors, depth, chunk_size, activation, initial), error)
    # detached (no-op without autograd): the compiled chunk functions guard on requires_grad, which differs between
    # a MAC segment's first state and later segments' (two graphs for the same work otherwise)
    out, new_w, new_s, boundaries = _scan_chunks(
        _detached(weights), _detached(momentum), _detached(sequence), chunk_size, activation, select_chunk,
        None if initial is None else _detached(initial), keep_states=keep_states,
    )  # fmt: skip
    return out, new_w, new_s, boundaries, False


def _scan_backward(tensors, boundaries, fused, grad_out, grad_state, depth, select_chunk, chunk_size, activation):
    """Gradients of the scan's `tensors` (weights, momentum, initial, the 8 sequence inputs) from those of its
    outputs, each chunk recomputed from its start state in `boundaries` (`_scan_forward`) and differentiated by hand
    (`memory_chunk_update_backward`), or by the fused backward kernel where the forward ran fused."""
    initial = tuple(t.detach() for t in tensors[2 * depth : -_SEQUENCE_INPUTS])
    sequence = tensors[-_SEQUENCE_INPUTS:]
    grad_sel_w, grad_sel_s = grad_state[:depth], grad_state[depth:]
    key = _triton_key(tensors, depth, chunk_size, activation, initial, backward=True)
    if fused and key not in _TRITON_FAILED:  # one fused launch (see the Triton section below)
        try:
            grad_w, grad_s, grad_initial, grad_sequence = _triton_scan_backward(
                boundaries, initial, sequence, grad_out, grad_sel_w, grad_sel_s, chunk_size, activation
            )
            grad_w = tuple(g.sum_to_size(w.shape) for g, w in zip(grad_w, tensors[:depth]))
            grad_s = tuple(g.sum_to_size(s.shape) for g, s in zip(grad_s, tensors[depth : 2 * depth]))
            return (*grad_w, *grad_s, *grad_initial, *grad_sequence)
        except Exception as error:
            _triton_failed(key, error)
    if fused:  # the kernel's forward with the PyTorch backward: per-chunk views of its boundary buffers
        boundaries = _chunk_states(*boundaries, sequence[0].shape[-2] // chunk_size)
    grad_pieces = []  # per chunk, last chunk first; concatenated at the end (no in-place writes: compile-safe)
    grad_initial = [torch.zeros_like(t) for t in initial]
    compiled = _use_compiled_memory()
    inputs = _chunks(sequence, chunk_size, canonical=compiled)
    chunk_backward = _chunk_functions()[1]
    zero = lambda ts: tuple(torch.zeros_like(t) for t in ts)  # noqa: E731
    if select_chunk is None:
        grad_w, grad_s = grad_sel_w, grad_sel_s
    else:
        grad_w, grad_s = zero(grad_sel_w), zero(grad_sel_s)
    for c in reversed(range(len(inputs))):
        if select_chunk is not None:
            grad_w = tuple(g + s for g, s in zip(grad_w, _select(select_chunk, c + 1, grad_sel_w, zero(grad_w))))
            grad_s = tuple(g + s for g, s in zip(grad_s, _select(select_chunk, c + 1, grad_sel_s, zero(grad_s))))
        start_w, start_s = boundaries[c]  # (made without autograd: already detached)
        grad_piece = grad_out[..., c * chunk_size : (c + 1) * chunk_size, :]
        grad_w, grad_s, grad_init, *grads = chunk_backward(
            start_w, start_s, *_detached(inputs[c]), activation, initial or None,
            _contiguous(grad_piece) if compiled else grad_piece, grad_w, grad_s,
        )  # fmt: skip
        grad_initial = [acc + g for acc, g in zip(grad_initial, grad_init or ())]
        grad_pieces.append(grads)
    if select_chunk is not None:  # rows that closed no chunk return their input state
        grad_w = tuple(g + s for g, s in zip(grad_w, _select(select_chunk, 0, grad_sel_w, zero(grad_w))))
        grad_s = tuple(g + s for g, s in zip(grad_s, _select(select_chunk, 0, grad_sel_s, zero(grad_s))))
    grad_sequence = [
        torch.cat(pieces[::-1], dim=-2 if i < 4 else -1)  # q, k, v, g split along time rows; the rest per token
        for i, pieces in enumerate(zip(*grad_pieces))
    ]
    return (*grad_w, *grad_s, *grad_initial, *grad_sequence)


def _chunk_states(states_w, states_s, n_chunks):
    """Per-chunk (weights, momentum) start states, as views of per-layer (slots, B, H, d_out, d_in) buffers."""
    return [(tuple(b[c] for b in states_w), tuple(b[c] for b in states_s)) for c in range(n_chunks)]


class _MemoryScanFunction(torch.autograd.Function):
    """`memory_scan` whose backward recomputes each chunk from its saved start state (activation checkpointing per
    chunk, done in one Function so that only one chunk's intermediates are alive in the backward) and differentiates
    it by hand (`memory_chunk_update_backward`)."""

    @staticmethod
    def forward(ctx, chunk_size, activation, depth, select_chunk, *tensors):
        out, new_w, new_s, ctx.boundaries, ctx.fused = _scan_forward(
            tensors, depth, chunk_size, activation, select_chunk, keep_states=True
        )
        ctx.chunk_size, ctx.activation, ctx.depth, ctx.select_chunk = chunk_size, activation, depth, select_chunk
        ctx.save_for_backward(*tensors)
        return (out, *new_w, *new_s)

    @staticmethod
    def backward(ctx, grad_out, *grad_state):
        boundaries, ctx.boundaries = ctx.boundaries, None
        grads = _scan_backward(
            ctx.saved_tensors, boundaries, ctx.fused, grad_out, grad_state, ctx.depth, ctx.select_chunk,
            ctx.chunk_size, ctx.activation,
        )  # fmt: skip
        return (None, None, None, None, *grads)


# The scan as one operator for graphs that torch.compile captures (`memory_scan` under tracing). Traced, the scan's
# Python loop over chunks is unrolled: the graph, its compile time and inductor's generated kernels grow with the
# number of chunks (a training step of MAG at 4 x 1,024 took 576 s to compile on a 2-core CPU). As an opaque operator
# it is one node at any length, run by `_scan_forward` / `_scan_backward`: the fused Triton kernels on CUDA, the
# chunk loop (compiled chunk functions under TITANS_MEMORY_KERNEL=compile) elsewhere; inductor fuses the rest of the
# model around it. Outputs: the memory outputs, the final (or selected) weights and momentum, and with `keep_states`
# the (n_chunks, B, H, d_out, d_in) start states of every chunk per layer, which the backward reads. The operator
# names carry a digest of this file: two versions of the code in one process (a checkout and another revision loaded
# as Hub remote code) never share an operator, identical copies register it once, and inductor's on-disk caches stay
# valid as long as the file does not change.
with open(__file__, "rb") as _source:
    _OP_NAMESPACE = "titans_" + hashlib.sha256(_source.read()).hexdigest()[:12]


def _unaliased(outputs, inputs):
    """Custom operators must not return their inputs or two views of one storage (e.g. a selected state that is
    still the input state): copies where they would."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    result = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        result.append(t.contiguous())
    return result


def _scan_op_forward(
    tensors: list[torch.Tensor], select_chunk: torch.Tensor | None, depth: int, chunk_size: int, activation: str,
    keep_states: bool,
) -> list[torch.Tensor]:
    out, new_w, new_s, boundaries, fused = _scan_forward(
        tuple(tensors), depth, chunk_size, activation, select_chunk, keep_states
    )
    states = []
    if keep_states:
        n_chunks = out.shape[-2] // chunk_size
        if fused:  # slots 0..n_chunks-1 of the kernels' buffers
            states = [b[:n_chunks] for b in (*boundaries[0], *boundaries[1])]
        else:
            states = [torch.stack([chunk[i][layer] for chunk in boundaries]) for i in (0, 1) for layer in range(depth)]
    return _unaliased([out, *new_w, *new_s, *states], [*tensors, select_chunk])


def _scan_op_fake(tensors, select_chunk, depth, chunk_size, activation, keep_states):
    q = tensors[-_SEQUENCE_INPUTS]
    batch, n_chunks = q.shape[0], q.shape[-2] // chunk_size
    states = [w.new_empty(batch, *w.shape[1:]) for w in tensors[: 2 * depth]]
    kept = [w.new_empty(n_chunks, batch, *w.shape[1:]) for w in tensors[: 2 * depth]] if keep_states else []
    return [torch.empty_like(q, memory_format=torch.contiguous_format), *states, *kept]


def _scan_op_backward(
    tensors: list[torch.Tensor], states: list[torch.Tensor], select_chunk: torch.Tensor | None,
    grad_out: torch.Tensor, grad_state: list[torch.Tensor], depth: int, chunk_size: int, activation: str,
) -> list[torch.Tensor]:
    tensors = tuple(tensors)
    n_chunks = tensors[-_SEQUENCE_INPUTS].shape[-2] // chunk_size
    fused = _use_triton_scan(tensors, depth, chunk_size, activation, select_chunk)
    boundaries = (states[:depth], states[depth:])
    if not fused:
        boundaries = _chunk_states(*boundaries, n_chunks)
    grads = _scan_backward(
        tensors, boundaries, fused, grad_out, grad_state, depth, select_chunk, chunk_size, activation
    )
    return _unaliased(list(grads), [*tensors, *states, select_chunk, grad_out, *grad_state])


def _scan_op_backward_fake(tensors, states, select_chunk, grad_out, grad_state, depth, chunk_size, activation):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


def _scan_op_setup_context(ctx, inputs, output):
    tensors, select_chunk, depth, chunk_size, activation, keep_states = inputs
    if not keep_states:
        raise RuntimeError("the memory scan operator differentiates only with keep_states=True")
    ctx.args = (len(tensors), select_chunk is not None, depth, chunk_size, activation)
    ctx.save_for_backward(*tensors, *output[1 + 2 * depth :], *([select_chunk] if select_chunk is not None else []))


def _scan_op_grad(ctx, grads):
    n, selects, depth, chunk_size, activation = ctx.args
    saved = ctx.saved_tensors
    tensors, states = saved[:n], saved[n : n + 2 * depth]
    select_chunk = saved[-1] if selects else None
    grad_out, grad_state = grads[0], grads[1 : 1 + 2 * depth]
    grad_out = torch.zeros_like(tensors[-_SEQUENCE_INPUTS]) if grad_out is None else grad_out
    grad_state = [torch.zeros_like(s[0]) if g is None else g for g, s in zip(grad_state, states)]
    grads = _MEMORY_SCAN_BACKWARD_OP(
        list(tensors), list(states), select_chunk, grad_out, grad_state, depth, chunk_size, activation
    )
    return list(grads), None, None, None, None, None


def _register_memory_scan_operators():
    """torch.ops.<_OP_NAMESPACE>.memory_scan and .memory_scan_backward (registered once per process and file)."""
    namespace = getattr(torch.ops, _OP_NAMESPACE)
    if not hasattr(namespace, "memory_scan"):
        backward = torch.library.custom_op(f"{_OP_NAMESPACE}::memory_scan_backward", _scan_op_backward, mutates_args=())
        backward.register_fake(_scan_op_backward_fake)
        forward = torch.library.custom_op(f"{_OP_NAMESPACE}::memory_scan", _scan_op_forward, mutates_args=())
        forward.register_fake(_scan_op_fake)
        forward.register_autograd(_scan_op_grad, setup_context=_scan_op_setup_context)
    return namespace.memory_scan, namespace.memory_scan_backward


_MEMORY_SCAN_OP, _MEMORY_SCAN_BACKWARD_OP = _register_memory_scan_operators()


# ----------------------------------------------------------------------------------------------------------------
# Optional fused Triton kernels for the chunk-parallel memory scan (forward and backward).
#
# The PyTorch scan above launches ~40 small kernels per chunk forward and ~100 backward, one chunk after the other;
# at long contexts the launches, not the FLOPs, dominate. Here one program per (batch, head) runs the whole scan over
# the chunks: one launch per layer forward, one backward. Same math as `memory_chunk_update` (forward, Eq. 16-18,
# D7, D19) and `memory_chunk_update_backward` (backward), fp32 state and accumulation; the PyTorch code stays the
# reference and the fallback (CPU, unsupported shapes, ragged `select_chunk`, torch.compile, TITANS_MEMORY_KERNEL).
#
# The chunk-boundary states live in a global fp32 buffer (n_chunks + 1 slots, or 2 when only the final state is
# wanted) rather than in loop-carried registers: a depth-2 state at d=64, E=128 is 128 KB. The forward writes slot
# c + 1 and the next iteration reads it back; the backward reads the boundary state of chunk c from that buffer, as
# the PyTorch backward does, and carries the state gradients in a 2-slot scratch buffer. Each program only touches
# its own (batch, head) slice; `tl.debug_barrier()` orders the write of one iteration before the reads of the next
# across the threads of the program.
#
# Products are tl.dot on (chunk x d / E) tiles, so d, E and the chunk size must be powers of two >= 16. Shared
# memory, not registers, is what limits the tile sizes (see `_tk_load`, `_TRITON_PRECISION`). The first call of a
# configuration compiles it (tens of seconds to minutes; Triton caches it on disk). They are the default on CUDA
# since they ran on an H200 (model card, "On a GPU with the fused kernels"): the PyTorch scan's results to ~1e-6,
# 7-8.5x faster.
# ----------------------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU users without triton lose nothing: the PyTorch scan is always there
    triton = None

_TRITON_ACTIVATIONS = {"silu": 0, "gelu": 1, "tanh": 2}
# Precision of the kernels' products (TITANS_MEMORY_KERNEL_PRECISION). Default "tf32x3": three tf32 tensor-core
# products per product, fp32-level accuracy. "ieee" is plain fp32 FMA (what the CPU tests use, in the interpreter),
# but at d=64, E=128 it compiles for minutes (the backward for over 7 on a slow CPU) and runs without tensor cores;
# "tf32" (10-bit mantissa, ~1e-3 relative error per product, compounding along the scan) is the fastest.
# Shared memory at d=64, E=128, chunk 64 (sm_90, compiled offline): forward 160 KB / backward 160 KB with tf32x3,
# 192 / 208 KB with tf32, of the 227 KB an H100/H200 block may use.
_TRITON_PRECISION = os.environ.get("TITANS_MEMORY_KERNEL_PRECISION", "tf32x3")
if _TRITON_PRECISION not in ("ieee", "tf32", "tf32x3"):
    raise ValueError(f"TITANS_MEMORY_KERNEL_PRECISION={_TRITON_PRECISION!r}: expected 'tf32x3', 'tf32' or 'ieee'")
# Warps per program (TITANS_MEMORY_KERNEL_WARPS; default 8 when E >= 128, else 4), for measuring on a GPU. Compiled
# offline for sm_90 at d=64, E=128, tf32x3 (ptxas -v), both use all 255 registers and spill. Spill space per thread:
# 8 warps 3.8 KB forward and 10.0 KB backward, 4 warps 4.1 and 10.3 KB; per program (256 or 128 threads) 4 warps
# keep about half the spilled bytes (backward 1.3 against 2.6 MB), with half the threads to run the products.
_TRITON_WARPS = os.environ.get("TITANS_MEMORY_KERNEL_WARPS")
if _TRITON_WARPS is not None and _TRITON_WARPS not in ("1", "2", "4", "8", "16"):
    raise ValueError(f"TITANS_MEMORY_KERNEL_WARPS={_TRITON_WARPS!r}: expected 1, 2, 4, 8 or 16")


def _triton_warps(E: int) -> int:
    return int(_TRITON_WARPS) if _TRITON_WARPS else (8 if E >= 128 else 4)


# Hidden-width block of the depth-2 kernels (TITANS_MEMORY_KERNEL_BLOCK; unset: the whole of E, `_tk_scan_fwd` /
# `_tk_scan_bwd`). A block EB < E runs `_tk_scan_fwd_blocked` / `_tk_scan_bwd_blocked`, which hold (C, EB) tiles
# instead of (C, E) ones and read q, k, G and the output gradient again at each use, to cut the register spills
# above, at the price of recomputing each block's forward once (forward) or three times (backward) per chunk.
# Offline for sm_90 at d=64, E=128, 8 warps, tf32x3 with EB=32: spill space 1.6 KB forward and 4.0 KB backward per
# thread (3.8 and 10.0 unblocked), static spill traffic 5.0 and 17.5 KB (12.9 and 62.3), shared memory 64 and 80 KB
# (160 and 160). Not yet timed on a GPU (`gpu_checks.sh tblock`): unset stays the default until it is.
_TRITON_BLOCK = os.environ.get("TITANS_MEMORY_KERNEL_BLOCK")
if _TRITON_BLOCK is not None and _TRITON_BLOCK not in ("16", "32", "64", "128"):
    raise ValueError(f"TITANS_MEMORY_KERNEL_BLOCK={_TRITON_BLOCK!r}: expected 16, 32, 64 or 128")


def _triton_block(depth: int, E: int) -> int | None:
    """The E block of the blocked kernels for this scan, or None for the unblocked ones."""
    block = int(_TRITON_BLOCK) if _TRITON_BLOCK else None
    return block if depth == 2 and block is not None and block < E else None


def _triton_constants(depth: int, D: int, E: int, chunk_size: int, activation: str, has_init: bool,
                      precision: str | None = None) -> dict:
    """The scan kernels' constexprs: DEPTH for `_tk_scan_fwd` / `_tk_scan_bwd`, or the block EB when the blocked
    depth-2 kernels run (`_triton_block`)."""
    constants = dict(D=D, E=E, C=chunk_size, ACT=_TRITON_ACTIVATIONS[activation], HAS_INIT=bool(has_init),
                     PREC=precision or _TRITON_PRECISION)  # fmt: skip
    block = _triton_block(depth, E)
    if block is None:
        constants["DEPTH"] = depth
    else:
        constants["EB"] = block
    return constants


def _memory_kernel_mode() -> str:
    """TITANS_MEMORY_KERNEL: `auto` (default: the fused Triton kernels below on CUDA tensors, the eager PyTorch scan
    otherwise), `torch` (always the eager PyTorch scan), `compile` (the PyTorch scan with each chunk's forward and
    backward torch.compile'd, `_chunk_functions`, and so is cached decoding: each memory's one-token step,
    `_compiled_decode_update`, and once every cache is full the whole step, `_compiled_decoding_step`) or `triton`
    (the kernels, and a kernel failure is an error). On an H200 the kernels matched the PyTorch scan to 1.3e-6
    relative and ran its forward + backward 7-8.5x faster (`results/triton_check_h200.json`); on CPU tensors `auto`
    is the PyTorch scan, so CPU users see no change."""
    mode = os.environ.get("TITANS_MEMORY_KERNEL", "auto").lower()
    if mode not in ("auto", "triton", "torch", "compile"):
        raise ValueError(f"TITANS_MEMORY_KERNEL={mode!r}: expected 'auto', 'torch', 'compile' or 'triton'")
    return mode


_TRITON_FAILED: dict = {}  # kernel configuration -> error, for kernels that failed to compile or launch


def _triton_key(tensors, depth, chunk_size, activation, initial, backward=False):
    q = tensors[-_SEQUENCE_INPUTS]
    return (backward, depth, q.shape[-1], tensors[0].shape[-2], chunk_size, activation, bool(initial), str(q.device))


def _triton_failed(key, error) -> None:
    """Under TITANS_MEMORY_KERNEL=triton a kernel failure is an error; under `auto` (e.g. not enough shared memory
    on a smaller GPU) that configuration falls back to the PyTorch scan from then on, with one warning."""
    if _memory_kernel_mode() == "triton":
        raise error
    _TRITON_FAILED[key] = repr(error)
    logger.warning_once(f"Titans memory Triton kernel failed ({error!r}); using the PyTorch scan for {key}.")


def _use_triton_scan(tensors, depth, chunk_size, activation, select_chunk) -> bool:
    """Whether the fused kernels run this scan: TITANS_MEMORY_KERNEL is `auto` (CUDA tensors) or `triton` (CUDA, or
    CPU under TRITON_INTERPRET=1 for testing), triton imports, not inside torch.compile, no ragged `select_chunk`,
    depth 1 or 2, a known activation, fp32 everywhere, and d, E, chunk size powers of two >= 16 (tl.dot tiles)."""
    mode = _memory_kernel_mode()
    if triton is None or mode not in ("auto", "triton") or select_chunk is not None or depth not in (1, 2):
        return False
    if activation not in _TRITON_ACTIVATIONS or torch.compiler.is_compiling():
        return False
    q = tensors[-_SEQUENCE_INPUTS]
    on_device = q.is_cuda or (mode == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1")
    if not on_device or any(t.dtype != torch.float32 or t.device != q.device for t in tensors):
        return False
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
    dims = {q.shape[-1], chunk_size} | {n for w in tensors[:depth] for n in w.shape[-2:]}
    if not all(pow2(n) for n in dims) or q.shape[-2] % chunk_size or q.shape[-2] == 0:
        return False
    initial = tensors[2 * depth : -_SEQUENCE_INPUTS]
    return _triton_key(tensors, depth, chunk_size, activation, initial) not in _TRITON_FAILED


if triton is not None:

    @triton.jit
    def _tk_act(z, ACT: tl.constexpr):  # σ
        if ACT == 0:
            y = z * tl.sigmoid(z)
        elif ACT == 1:
            y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        else:
            y = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        return y

    @triton.jit
    def _tk_act_grad(z, ACT: tl.constexpr):  # σ'
        if ACT == 0:
            s = tl.sigmoid(z)
            y = s * (1.0 + z * (1.0 - s))
        elif ACT == 1:
            y = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
        else:
            t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
            y = 1.0 - t * t
        return y

    @triton.jit
    def _tk_act_grad2(z, ACT: tl.constexpr):  # σ''
        if ACT == 0:
            s = tl.sigmoid(z)
            y = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
        elif ACT == 1:
            y = tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
        else:
            t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
            y = -2.0 * t * (1.0 - t * t)
        return y

    @triton.jit
    def _tk_mm(a, b, PREC: tl.constexpr):  # a @ b
        return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _tk_mm_nt(a, b, PREC: tl.constexpr):  # a @ bᵀ
        return tl.dot(a, tl.trans(b), input_precision=PREC)

    @triton.jit
    def _tk_mm_tn(a, b, PREC: tl.constexpr):  # aᵀ @ b
        return tl.dot(tl.trans(a), b, input_precision=PREC)

    # Every tile load is volatile: the compiler then neither merges two loads of one tile nor hoists them, so a tile
    # that several distant products use is read again from L2 at each (cheap) instead of being parked in shared
    # memory between them (parked copies took the backward to 464 KB of shared memory at d=64, E=128).
    @triton.jit
    def _tk_load(ptr, R: tl.constexpr, K: tl.constexpr, S: tl.constexpr = 0):  # (R, K) tile, row stride S (or K)
        rows, cols = tl.arange(0, R), tl.arange(0, K)
        return tl.load(ptr + rows[:, None] * (S if S > 0 else K) + cols[None, :], volatile=True)

    @triton.jit
    def _tk_store(ptr, x, R: tl.constexpr, K: tl.constexpr, S: tl.constexpr = 0):
        rows, cols = tl.arange(0, R), tl.arange(0, K)
        tl.store(ptr + rows[:, None] * (S if S > 0 else K) + cols[None, :], x)

    @triton.jit
    def _tk_load_t(ptr, R: tl.constexpr, K: tl.constexpr, S: tl.constexpr = 0):  # transpose (K, R) of an (R, K) tile
        rows, cols = tl.arange(0, R), tl.arange(0, K)
        return tl.load(ptr + rows[None, :] * (S if S > 0 else K) + cols[:, None], volatile=True)

    @triton.jit
    def _tk_hidden(k_ptr, w0_ptr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, ACT: tl.constexpr,
                   PREC: tl.constexpr):  # a_1 = σ(k W_0ᵀ), recomputed from fresh loads
        return _tk_act(_tk_mm(_tk_load(k_ptr, C, D), _tk_load_t(w0_ptr, E, D), PREC), ACT)

    @triton.jit
    def _tk_load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr, tok, D: tl.constexpr,
                       C: tl.constexpr):
        """The inputs of one chunk starting at row `tok`: q, k, v (C x D), its G block (C x C) and last row, and the
        per-token coefficients n_last, β, f with the chunk-end scalars β_b, f_b, m_b (`memory_chunk_coefficients`)."""
        rc = tl.arange(0, C)
        q = _tk_load(q_ptr + tok * D, C, D)
        k = _tk_load(k_ptr + tok * D, C, D)
        v = _tk_load(v_ptr + tok * D, C, D)
        gs = _tk_load(g_ptr + tok * C, C, C)
        g_last = tl.load(g_ptr + (tok + C - 1) * C + rc)
        n_last = tl.load(nl_ptr + tok + rc)
        beta = tl.load(beta_ptr + tok + rc)
        f = tl.load(f_ptr + tok + rc)
        beta_l = tl.load(beta_ptr + tok + C - 1)
        f_l = tl.load(f_ptr + tok + C - 1)
        m_l = tl.load(m_ptr + tok + C - 1)
        return q, k, v, gs, g_last, n_last, beta, f, beta_l, f_l, m_l

    # State tiles enter products through pointers, loaded (already transposed where needed) right before each
    # product: a `tl.trans` of a tile used by several products keeps a shared-memory copy alive between them, and at
    # d=64, E=128 six such 32 KB copies exceed the 227 KB of shared memory of an H100.

    @triton.jit
    def _tk_retrieve(h, w_ptr, s_ptr, i_ptr, inp, delta, gs, beta, f, O: tl.constexpr, I: tl.constexpr,
                     HAS_INIT: tl.constexpr, PREC: tl.constexpr, SCORED: tl.constexpr = False):
        """Pre-activation of one memory layer (O x I) at every token's own weights M_i, by the dual form:
        z = β h Wᵀ + f h Sᵀ + (1 - β) h M_initᵀ - (G ∘ h aᵀ) δ (`memory_chunk_update`). SCORED: `gs` is already
        G ∘ h aᵀ (the blocked kernels form it once per chunk) and `inp` is not read."""
        z = beta[:, None] * _tk_mm(h, _tk_load_t(w_ptr, O, I), PREC)
        z += f[:, None] * _tk_mm(h, _tk_load_t(s_ptr, O, I), PREC)
        if HAS_INIT:
            z += (1.0 - beta[:, None]) * _tk_mm(h, _tk_load_t(i_ptr, O, I), PREC)
        if SCORED:
            scored = gs
        else:
            scored = gs * _tk_mm_nt(h, inp, PREC)
        return z - _tk_mm(scored, delta, PREC)

    @triton.jit
    def _tk_new_state(w_ptr, s_ptr, i_ptr, new_w_ptr, new_s_ptr, inp, delta, g_last, n_last, beta_l, f_l, m_l,
                      O: tl.constexpr, I: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr,
                      S: tl.constexpr = 0):
        """Chunk-end weights and momentum (an (O, I) tile, row stride S), written to `new_*_ptr`:
        W' = β_b W + f_b S - (δ ∘ g_b)ᵀ a + (1 - β_b) M_init,  S' = m_b S - (δ ∘ n)ᵀ a."""
        s = _tk_load(s_ptr, O, I, S)
        new_w = beta_l * _tk_load(w_ptr, O, I, S) + f_l * s - _tk_mm_tn(delta * g_last[:, None], inp, PREC)
        if HAS_INIT:
            new_w += (1.0 - beta_l) * _tk_load(i_ptr, O, I, S)
        _tk_store(new_w_ptr, new_w, O, I, S)
        _tk_store(new_s_ptr, m_l * s - _tk_mm_tn(delta * n_last[:, None], inp, PREC), O, I, S)

    @triton.jit
    def _tk_scan_fwd(
        q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr,
        w0_ptr, s0_ptr, i0_ptr, w1_ptr, s1_ptr, i1_ptr, out_ptr,
        n_chunks, heads, state_slots, BH,
        D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr,
        HAS_INIT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Program (batch, head) runs `memory_chunk_update` over all chunks; slot c of the state buffers holds the
        state at the start of chunk c (slot c % state_slots)."""
        pid = tl.program_id(0).to(tl.int64)
        head = pid % heads
        T = n_chunks * C
        for c in range(n_chunks):
            tok = pid * T + c * C  # first token of the chunk in the flattened (B*H*T) rows
            q, k, v, gs, g_last, n_last, beta, f, beta_l, f_l, m_l = _tk_load_chunk(
                q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr, tok, D, C)
            cur = (c % state_slots) * BH + pid
            nxt = ((c + 1) % state_slots) * BH + pid
            r0 = 1.0 / (1.0 + tl.sum(k * k, 1))  # D19 normalisation of the layer-0 input (the key)
            if DEPTH == 1:
                w0, s0, i0 = w0_ptr + cur * D * D, s0_ptr + cur * D * D, i0_ptr + head * D * D
                # gradient factors at the chunk-start weights (Eq. 12, 16): δ = 2 (W k - v) / (1 + |k|²)
                d0 = 2.0 * (_tk_mm(k, _tk_load_t(w0, D, D), PREC) - v) * r0[:, None]
                out = _tk_retrieve(q, w0, s0, i0, k, d0, gs, beta, f, D, D, HAS_INIT, PREC)
                _tk_new_state(w0, s0, i0, w0_ptr + nxt * D * D, s0_ptr + nxt * D * D, k, d0, g_last, n_last,
                              beta_l, f_l, m_l, D, D, HAS_INIT, PREC)
            else:
                w0, s0, i0 = w0_ptr + cur * E * D, s0_ptr + cur * E * D, i0_ptr + head * E * D
                w1, s1, i1 = w1_ptr + cur * D * E, s1_ptr + cur * D * E, i1_ptr + head * D * E
                # forward on the keys with the residual M(k) = k + W1 σ(W0 k), then the analytic deltas
                z0 = _tk_mm(k, _tk_load_t(w0, E, D), PREC)
                a1 = _tk_act(z0, ACT)
                raw1 = 2.0 * (_tk_mm(a1, _tk_load_t(w1, D, E), PREC) + k - v)
                raw0 = _tk_mm(raw1, _tk_load(w1, D, E), PREC) * _tk_act_grad(z0, ACT)
                d0 = raw0 * r0[:, None]
                d1 = raw1 * (1.0 / (1.0 + tl.sum(a1 * a1, 1)))[:, None]
                h1 = _tk_act(_tk_retrieve(q, w0, s0, i0, k, d0, gs, beta, f, E, D, HAS_INIT, PREC), ACT)
                out = _tk_retrieve(h1, w1, s1, i1, a1, d1, gs, beta, f, D, E, HAS_INIT, PREC) + q
                _tk_new_state(w0, s0, i0, w0_ptr + nxt * E * D, s0_ptr + nxt * E * D, k, d0, g_last, n_last,
                              beta_l, f_l, m_l, E, D, HAS_INIT, PREC)
                _tk_new_state(w1, s1, i1, w1_ptr + nxt * D * E, s1_ptr + nxt * D * E, a1, d1, g_last, n_last,
                              beta_l, f_l, m_l, D, E, HAS_INIT, PREC)
            _tk_store(out_ptr + tok * D, out, C, D)
            tl.debug_barrier()  # slot c + 1 written by all threads before the next iteration reads it

    @triton.jit
    def _tk_block_forward(qp, kp, rp, sp, w0, s0, i0, w1, r0, beta, f, D: tl.constexpr, E: tl.constexpr,
                          C: tl.constexpr, EB: tl.constexpr, ACT: tl.constexpr, HAS_INIT: tl.constexpr,
                          PREC: tl.constexpr):
        """The blocked kernels' recomputation of one block of E (layer 0's rows w0, s0, i0 and layer 1's columns w1,
        already offset to the block) from the chunk's tiles in memory: q, k, raw_1 (`rp`) and G ∘ q kᵀ (`sp`).
        Returns z_0 = k W_0ᵀ, a_1 = σ(z_0), carried_0 = raw_1 W_1, δ_0 = carried_0 σ'(z_0) r_0 and layer 0's
        retrieval pre-activation z_q."""
        z0 = _tk_mm(_tk_load(kp, C, D), _tk_load_t(w0, EB, D), PREC)
        a1 = _tk_act(z0, ACT)
        carried0 = _tk_mm(_tk_load(rp, C, D), _tk_load(w1, D, EB, E), PREC)
        d0 = carried0 * _tk_act_grad(z0, ACT) * r0[:, None]
        zq = _tk_retrieve(_tk_load(qp, C, D), w0, s0, i0, 0, d0, _tk_load(sp, C, C), beta, f, EB, D, HAS_INIT, PREC,
                          True)  # fmt: skip
        return z0, a1, carried0, d0, zq

    @triton.jit
    def _tk_scan_fwd_blocked(
        q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr,
        w0_ptr, s0_ptr, i0_ptr, w1_ptr, s1_ptr, i1_ptr, out_ptr, x_ptr,
        n_chunks, heads, state_slots, BH,
        D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, EB: tl.constexpr, ACT: tl.constexpr,
        HAS_INIT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """`_tk_scan_fwd` for depth 2 with the hidden width E taken EB columns at a time, so that no (C, E) tile is
        ever held: every product then works on (C, EB) tiles. Layer 0's rows and layer 1's columns split along E,
        so the chunk-end states, the hidden activations and layer 0's retrieval are computed block by block; what
        sums over E (layer 1's prediction on the keys, |a_1|², its retrieval and its score h aᵀ) accumulates over
        the blocks. Two passes over E per chunk: the first forms δ_1, which every block of the second needs.
        Layer 0's retrieval scores G ∘ q kᵀ, which every block uses, wait in `x_ptr` (C x C per program)."""
        pid = tl.program_id(0).to(tl.int64)
        head = pid % heads
        T = n_chunks * C
        xs = x_ptr + pid * C * C
        for c in range(n_chunks):
            tok = pid * T + c * C
            q, k, v, gs, g_last, n_last, beta, f, beta_l, f_l, m_l = _tk_load_chunk(
                q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr, tok, D, C)
            qp, kp, gp = q_ptr + tok * D, k_ptr + tok * D, g_ptr + tok * C
            cur = (c % state_slots) * BH + pid
            nxt = ((c + 1) % state_slots) * BH + pid
            w0, s0, i0 = w0_ptr + cur * E * D, s0_ptr + cur * E * D, i0_ptr + head * E * D
            w1, s1, i1 = w1_ptr + cur * D * E, s1_ptr + cur * D * E, i1_ptr + head * D * E
            r0 = 1.0 / (1.0 + tl.sum(k * k, 1))
            # pass 1: layer 1's prediction on the keys, a_1 W_1ᵀ, and |a_1|², summed over the blocks of E
            pred = tl.zeros((C, D), dtype=tl.float32)
            norm1 = tl.zeros((C,), dtype=tl.float32)
            for e in range(0, E, EB):
                a1 = _tk_act(_tk_mm(_tk_load(kp, C, D), _tk_load_t(w0 + e * D, EB, D), PREC), ACT)
                pred += _tk_mm(a1, _tk_load_t(w1 + e, D, EB, E), PREC)
                norm1 += tl.sum(a1 * a1, 1)
            # δ_1 = raw_1 r_1; raw_1 waits in this chunk's output rows (written last), read back where needed
            op = out_ptr + tok * D
            _tk_store(op, 2.0 * (pred + k - v), C, D)
            _tk_store(xs, gs * _tk_mm_nt(q, k, PREC), C, C)
            r1 = 1.0 / (1.0 + norm1)
            tl.debug_barrier()
            # pass 2: per block, δ_0, layer 0's retrieval h_1, both layers' chunk-end states; layer 1's retrieval
            # and its score sum over the blocks
            out = _tk_load(qp, C, D)
            score1 = tl.zeros((C, C), dtype=tl.float32)
            for e in range(0, E, EB):
                _, a1, _, d0, zq = _tk_block_forward(qp, kp, op, xs, w0 + e * D, s0 + e * D, i0 + e * D, w1 + e, r0,
                                                     beta, f, D, E, C, EB, ACT, HAS_INIT, PREC)  # fmt: skip
                h1 = _tk_act(zq, ACT)
                out += beta[:, None] * _tk_mm(h1, _tk_load_t(w1 + e, D, EB, E), PREC)
                out += f[:, None] * _tk_mm(h1, _tk_load_t(s1 + e, D, EB, E), PREC)
                if HAS_INIT:
                    out += (1.0 - beta[:, None]) * _tk_mm(h1, _tk_load_t(i1 + e, D, EB, E), PREC)
                score1 += _tk_mm_nt(h1, a1, PREC)
                _tk_new_state(w0 + e * D, s0 + e * D, i0 + e * D, w0_ptr + nxt * E * D + e * D,
                              s0_ptr + nxt * E * D + e * D, _tk_load(kp, C, D), d0, g_last, n_last, beta_l, f_l, m_l,
                              EB, D, HAS_INIT, PREC)  # fmt: skip
                _tk_new_state(w1 + e, s1 + e, i1 + e, w1_ptr + nxt * D * E + e, s1_ptr + nxt * D * E + e, a1,
                              _tk_load(op, C, D) * r1[:, None],
                              g_last, n_last, beta_l, f_l, m_l, D, EB, HAS_INIT, PREC, E)  # fmt: skip
            out -= _tk_mm(_tk_load(gp, C, C) * score1, _tk_load(op, C, D) * r1[:, None], PREC)
            tl.debug_barrier()
            _tk_store(op, out, C, D)
            tl.debug_barrier()  # slot c + 1 written by all threads before the next iteration reads it

    @triton.jit
    def _tk_state_bwd(dw_ptr, ds_ptr, w_ptr, s_ptr, i_ptr, inp, delta, g_last, n_last, O: tl.constexpr,
                      I: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr):
        """Backward of the chunk-end state of one layer (`_tk_new_state`) given dW', dS', except its (O x I) terms
        (added where the W, S, M_init gradients are formed): the scalar gradients of β_b, f_b, m_b, and those of δ,
        row b of G, n and a."""
        dw = _tk_load(dw_ptr, O, I)
        s = _tk_load(s_ptr, O, I)
        kept = _tk_load(w_ptr, O, I)  # what β scales: W - M_init
        if HAS_INIT:
            kept -= _tk_load(i_ptr, O, I)
        g_beta_l = tl.sum(tl.sum(dw * kept, 1), 0)
        g_f_l = tl.sum(tl.sum(dw * s, 1), 0)
        g_m_l = tl.sum(tl.sum(_tk_load(ds_ptr, O, I) * s, 1), 0)
        a_dw = _tk_mm(inp, _tk_load_t(dw_ptr, O, I), PREC)
        a_ds = _tk_mm(inp, _tk_load_t(ds_ptr, O, I), PREC)
        g_delta = -g_last[:, None] * a_dw - n_last[:, None] * a_ds
        g_g_last = -tl.sum(delta * a_dw, 1)
        g_n_last = -tl.sum(delta * a_ds, 1)
        g_inp = -_tk_mm(delta * g_last[:, None], _tk_load(dw_ptr, O, I), PREC)
        g_inp -= _tk_mm(delta * n_last[:, None], _tk_load(ds_ptr, O, I), PREC)
        return g_beta_l, g_f_l, g_m_l, g_delta, g_g_last, g_n_last, g_inp

    @triton.jit
    def _tk_retrieve_bwd(dz, h, w_ptr, s_ptr, i_ptr, dw_ptr, ds_ptr, gs_out_ptr, di_ptr, inp, delta, gs, beta, f,
                         beta_l, f_l, m_l, O: tl.constexpr, I: tl.constexpr, HAS_INIT: tl.constexpr,
                         PREC: tl.constexpr):
        """Backward of `_tk_retrieve` given dz: gradients of h, β, f (per token), δ, G, a and the W-tile gradient
        β dzᵀ h + β_b dW' (the caller adds the terms through the keys). The momentum gradient
        f dzᵀ h + f_b dW' + m_b dS' is final here and goes to `gs_out_ptr`; the M_init one,
        (1 - β) dzᵀ h + (1 - β_b) dW', is added to `di_ptr`."""
        back_w = _tk_mm(dz, _tk_load(w_ptr, O, I), PREC)
        back_s = _tk_mm(dz, _tk_load(s_ptr, O, I), PREC)
        back_kept = back_w
        g_h = f[:, None] * back_s
        if HAS_INIT:  # β W + (1 - β) M_init = β (W - M_init) + M_init
            back_i = _tk_mm(dz, _tk_load(i_ptr, O, I), PREC)
            back_kept -= back_i
            g_h += back_i
        g_h += beta[:, None] * back_kept
        g_beta = tl.sum(h * back_kept, 1)
        g_f = tl.sum(h * back_s, 1)
        dw = _tk_load(dw_ptr, O, I)
        gw = _tk_mm_tn(beta[:, None] * dz, h, PREC) + beta_l * dw
        g_s = _tk_mm_tn(f[:, None] * dz, h, PREC) + f_l * dw + m_l * _tk_load(ds_ptr, O, I)
        _tk_store(gs_out_ptr, g_s, O, I)
        if HAS_INIT:  # load, barrier, store: a thread must not overwrite what another has yet to read
            g_i = _tk_mm_tn((1.0 - beta[:, None]) * dz, h, PREC) + (1.0 - beta_l) * dw + _tk_load(di_ptr, O, I)
            tl.debug_barrier()
            _tk_store(di_ptr, g_i, O, I)
        score = _tk_mm_nt(h, inp, PREC)
        g_score = -_tk_mm_nt(dz, delta, PREC)
        g_delta = -_tk_mm_tn(gs * score, dz, PREC)
        g_g = score * g_score
        g_score = gs * g_score
        g_h += _tk_mm(g_score, inp, PREC)
        g_inp = _tk_mm_tn(g_score, h, PREC)
        return g_h, g_beta, g_f, gw, g_delta, g_g, g_inp

    @triton.jit
    def _tk_store_chunk_grads(dq_ptr, dk_ptr, dv_ptr, dg_ptr, dnl_ptr, dbeta_ptr, df_ptr, dm_ptr, tok, g_q, g_k, g_v,
                              g_g, g_g_last, g_n, g_beta, g_f, g_beta_l, g_f_l, g_m_l, D: tl.constexpr,
                              C: tl.constexpr):
        """The per-token gradients of one chunk; row b of G, β_b, f_b, m_b also reach the chunk end."""
        rc = tl.arange(0, C)
        last_row = rc == C - 1
        _tk_store(dq_ptr + tok * D, g_q, C, D)
        _tk_store(dk_ptr + tok * D, g_k, C, D)
        _tk_store(dv_ptr + tok * D, g_v, C, D)
        _tk_store(dg_ptr + tok * C, g_g + tl.where(last_row[:, None], g_g_last[None, :], 0.0), C, C)
        tl.store(dnl_ptr + tok + rc, g_n)
        tl.store(dbeta_ptr + tok + rc, g_beta + tl.where(last_row, g_beta_l, 0.0))
        tl.store(df_ptr + tok + rc, g_f + tl.where(last_row, g_f_l, 0.0))
        tl.store(dm_ptr + tok + rc, tl.where(last_row, g_m_l, 0.0))

    @triton.jit
    def _tk_scan_bwd(
        q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr,
        w0_ptr, s0_ptr, i0_ptr, w1_ptr, s1_ptr, i1_ptr, dout_ptr,
        dw0_ptr, ds0_ptr, dw1_ptr, ds1_ptr, di0_ptr, di1_ptr,
        dq_ptr, dk_ptr, dv_ptr, dg_ptr, dnl_ptr, dbeta_ptr, df_ptr, dm_ptr,
        n_chunks, heads, BH,
        D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr,
        HAS_INIT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Backward of `_tk_scan_fwd` (`memory_chunk_update_backward` per chunk), chunks in reverse: the boundary
        state of chunk c is read from the forward's buffers (slot c), the gradients of the chunk-end state from the
        2-slot scratch (slot (c + 1) % 2), and those of the chunk-start state go to slot c % 2. The M_init gradients
        accumulate per (batch, head) in di*."""
        pid = tl.program_id(0).to(tl.int64)
        head = pid % heads
        T = n_chunks * C
        for step in range(n_chunks):
            c = n_chunks - 1 - step
            tok = pid * T + c * C
            q, k, v, gs, g_last, n_last, beta, f, beta_l, f_l, m_l = _tk_load_chunk(
                q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr, tok, D, C)
            dout = _tk_load(dout_ptr + tok * D, C, D)
            cur = c * BH + pid  # boundary state of chunk c
            g_in = ((c + 1) % 2) * BH + pid  # gradient of the chunk-end state
            g_out = (c % 2) * BH + pid  # gradient of the chunk-start state
            r0 = 1.0 / (1.0 + tl.sum(k * k, 1))
            if DEPTH == 1:
                w0, s0, i0 = w0_ptr + cur * D * D, s0_ptr + cur * D * D, i0_ptr + head * D * D
                dw0, ds0, di0 = dw0_ptr + g_in * D * D, ds0_ptr + g_in * D * D, di0_ptr + pid * D * D
                raw0 = 2.0 * (_tk_mm(k, _tk_load_t(w0, D, D), PREC) - v)
                d0 = raw0 * r0[:, None]
                g_beta_l, g_f_l, g_m_l, gd0, g_g_last, g_n, ga0 = _tk_state_bwd(
                    dw0, ds0, w0, s0, i0, k, d0, g_last, n_last, D, D, HAS_INIT, PREC)
                # retrieval (one layer, no residual): out = z
                g_q, g_beta, g_f, gw0, gd_, g_g, ga_ = _tk_retrieve_bwd(
                    dout, q, w0, s0, i0, dw0, ds0, ds0_ptr + g_out * D * D, di0, k, d0, gs, beta, f,
                    beta_l, f_l, m_l, D, D, HAS_INIT, PREC)
                gd0 += gd_
                ga0 += ga_
                # D19 normalisation δ = raw r, r = 1 / (1 + |k|²)
                ga0 -= (2.0 * tl.sum(gd0 * raw0, 1) * r0 * r0)[:, None] * k
                g_pred = 2.0 * gd0 * r0[:, None]
                g_v = -g_pred
                gw0 += _tk_mm_tn(g_pred, k, PREC)
                g_k = ga0 + _tk_mm(g_pred, _tk_load(w0, D, D), PREC)
                _tk_store(dw0_ptr + g_out * D * D, gw0, D, D)
            else:
                w0, s0, i0 = w0_ptr + cur * E * D, s0_ptr + cur * E * D, i0_ptr + head * E * D
                w1, s1, i1 = w1_ptr + cur * D * E, s1_ptr + cur * D * E, i1_ptr + head * D * E
                # q, k and a_1 = σ(k W_0ᵀ) are read / recomputed again at each distant use (see `_tk_load`)
                qp, kp = q_ptr + tok * D, k_ptr + tok * D
                dw0, ds0, di0 = dw0_ptr + g_in * E * D, ds0_ptr + g_in * E * D, di0_ptr + pid * E * D
                dw1, ds1, di1 = dw1_ptr + g_in * D * E, ds1_ptr + g_in * D * E, di1_ptr + pid * D * E
                z0 = _tk_mm(k, _tk_load_t(w0, E, D), PREC)
                a1 = _tk_act(z0, ACT)
                slope0 = _tk_act_grad(z0, ACT)
                raw1 = 2.0 * (_tk_mm(a1, _tk_load_t(w1, D, E), PREC) + k - v)
                carried0 = _tk_mm(raw1, _tk_load(w1, D, E), PREC)
                raw0 = carried0 * slope0
                r1 = 1.0 / (1.0 + tl.sum(a1 * a1, 1))
                d0 = raw0 * r0[:, None]
                d1 = raw1 * r1[:, None]
                # chunk-end states
                g_beta_l, g_f_l, g_m_l, gd0, g_g_last, g_n, ga0 = _tk_state_bwd(
                    dw0, ds0, w0, s0, i0, _tk_load(kp, C, D), d0, g_last, n_last, E, D, HAS_INIT, PREC)
                gb1, gf1, gm1, gd1, gg1, gn1, ga1 = _tk_state_bwd(
                    dw1, ds1, w1, s1, i1, _tk_hidden(kp, w0, C, D, E, ACT, PREC), d1, g_last, n_last, D, E, HAS_INIT,
                    PREC)
                g_beta_l += gb1
                g_f_l += gf1
                g_m_l += gm1
                g_g_last += gg1
                g_n += gn1
                # retrieval: recompute z of layer 0 and h1 = σ(z), then back from the output (out = z1 + q)
                zq = _tk_retrieve(_tk_load(qp, C, D), w0, s0, i0, _tk_load(kp, C, D), d0, gs, beta, f, E, D, HAS_INIT,
                                  PREC)
                h1 = _tk_act(zq, ACT)
                g_h, g_beta, g_f, gw1, gd_, g_g, ga_ = _tk_retrieve_bwd(
                    _tk_load(dout_ptr + tok * D, C, D), h1, w1, s1, i1, dw1, ds1, ds1_ptr + g_out * D * E, di1,
                    _tk_hidden(kp, w0, C, D, E, ACT, PREC), d1, gs, beta, f, beta_l, f_l, m_l, D, E, HAS_INIT, PREC)
                gd1 += gd_
                ga1 += ga_
                g_h, g_beta_, g_f_, gw0, gd_, g_g_, ga_ = _tk_retrieve_bwd(
                    g_h * _tk_act_grad(zq, ACT), _tk_load(qp, C, D), w0, s0, i0, dw0, ds0, ds0_ptr + g_out * E * D,
                    di0, _tk_load(kp, C, D), d0, gs, beta, f, beta_l, f_l, m_l, E, D, HAS_INIT, PREC)
                g_beta += g_beta_
                g_f += g_f_
                g_g += g_g_
                gd0 += gd_
                ga0 += ga_
                g_q = dout + g_h
                # D19 normalisation of both layers' deltas
                ga0 -= (2.0 * tl.sum(gd0 * raw0, 1) * r0 * r0)[:, None] * k
                gd0 = gd0 * r0[:, None]
                ga1 -= (2.0 * tl.sum(gd1 * raw1, 1) * r1 * r1)[:, None] * a1
                gd1 = gd1 * r1[:, None]
                # δ_0 = (δ_1 W_1) ∘ σ'(z_0): its backward needs σ''
                g_carried = gd0 * slope0
                z0 = _tk_mm(_tk_load(kp, C, D), _tk_load_t(w0, E, D), PREC)  # recomputed, not kept
                g_pre0 = gd0 * carried0 * _tk_act_grad2(z0, ACT)
                gd1 += _tk_mm(g_carried, _tk_load_t(w1, D, E), PREC)
                gw1 += _tk_mm_tn(raw1, g_carried, PREC)
                g_pred = 2.0 * gd1
                g_v = -g_pred
                # forward on the keys: a_1 = σ(k W_0ᵀ), M(k) = a_1 W_1ᵀ + k
                gw1 += _tk_mm_tn(g_pred, _tk_hidden(kp, w0, C, D, E, ACT, PREC), PREC)
                dz0 = (ga1 + _tk_mm(g_pred, _tk_load(w1, D, E), PREC)) * slope0 + g_pre0
                gw0 += _tk_mm_tn(dz0, _tk_load(kp, C, D), PREC)
                g_k = g_pred + ga0 + _tk_mm(dz0, _tk_load(w0, E, D), PREC)
                _tk_store(dw0_ptr + g_out * E * D, gw0, E, D)
                _tk_store(dw1_ptr + g_out * D * E, gw1, D, E)
            _tk_store_chunk_grads(dq_ptr, dk_ptr, dv_ptr, dg_ptr, dnl_ptr, dbeta_ptr, df_ptr, dm_ptr, tok, g_q, g_k,
                                  g_v, g_g, g_g_last, g_n, g_beta, g_f, g_beta_l, g_f_l, g_m_l, D, C)  # fmt: skip
            tl.debug_barrier()  # slot c % 2 written by all threads before chunk c - 1 reads it

    @triton.jit
    def _tk_scan_bwd_blocked(
        q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr,
        w0_ptr, s0_ptr, i0_ptr, w1_ptr, s1_ptr, i1_ptr, dout_ptr,
        dw0_ptr, ds0_ptr, dw1_ptr, ds1_ptr, di0_ptr, di1_ptr,
        dq_ptr, dk_ptr, dv_ptr, dg_ptr, dnl_ptr, dbeta_ptr, df_ptr, dm_ptr, x_ptr,
        n_chunks, heads, BH,
        D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, EB: tl.constexpr, ACT: tl.constexpr,
        HAS_INIT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """`_tk_scan_bwd` for depth 2, E taken EB columns at a time (see `_tk_scan_fwd_blocked`); the same
        gradients, in four passes over E per chunk, each recomputing the block's forward from the boundary state:
        1. layer 1's prediction and |a_1|² (so δ_1), and the chunk-end state's backward into δ_1 (sums over E);
        2. layer 1's retrieval score h_1 a_1ᵀ (a sum over E), which the gradient of δ_1 and every block's g_h need;
        3. per block, both retrievals' and both chunk-end states' backward, down to δ_0's dependence on δ_1; the
           gradient of z_0 that does not pass through δ_1 is parked in `x_ptr` (per program C x E, then two C x C
           tiles: G ∘ layer 1's score gradient and G ∘ q kᵀ);
        4. with δ_1's gradient complete, the rest of z_0's gradient, W_0, W_1 and the keys."""
        pid = tl.program_id(0).to(tl.int64)
        head = pid % heads
        T = n_chunks * C
        x = x_ptr + pid * (C * E + 2 * C * C)
        xs = x + C * E  # (C, C) after the (C, E) block: G ∘ the score gradient of layer 1's retrieval
        xp = xs + C * C  # and layer 0's retrieval scores G ∘ q kᵀ
        for step in range(n_chunks):
            c = n_chunks - 1 - step
            tok = pid * T + c * C
            q, k, v, gs, g_last, n_last, beta, f, beta_l, f_l, m_l = _tk_load_chunk(
                q_ptr, k_ptr, v_ptr, g_ptr, nl_ptr, beta_ptr, f_ptr, m_ptr, tok, D, C)
            qp, kp, dp, gp = q_ptr + tok * D, k_ptr + tok * D, dout_ptr + tok * D, g_ptr + tok * C
            cur = c * BH + pid
            g_in = ((c + 1) % 2) * BH + pid
            g_out = (c % 2) * BH + pid
            w0, s0, i0 = w0_ptr + cur * E * D, s0_ptr + cur * E * D, i0_ptr + head * E * D
            w1, s1, i1 = w1_ptr + cur * D * E, s1_ptr + cur * D * E, i1_ptr + head * D * E
            dw0, ds0, di0 = dw0_ptr + g_in * E * D, ds0_ptr + g_in * E * D, di0_ptr + pid * E * D
            dw1, ds1, di1 = dw1_ptr + g_in * D * E, ds1_ptr + g_in * D * E, di1_ptr + pid * D * E
            gw0, gs0 = dw0_ptr + g_out * E * D, ds0_ptr + g_out * E * D
            gw1, gs1 = dw1_ptr + g_out * D * E, ds1_ptr + g_out * D * E
            r0 = 1.0 / (1.0 + tl.sum(k * k, 1))
            # pass 1
            pred = tl.zeros((C, D), dtype=tl.float32)
            a_dw1 = tl.zeros((C, D), dtype=tl.float32)
            a_ds1 = tl.zeros((C, D), dtype=tl.float32)
            norm1 = tl.zeros((C,), dtype=tl.float32)
            g_beta_l = 0.0
            g_f_l = 0.0
            g_m_l = 0.0
            for e in range(0, E, EB):
                a1 = _tk_act(_tk_mm(k, _tk_load_t(w0 + e * D, EB, D), PREC), ACT)
                pred += _tk_mm(a1, _tk_load_t(w1 + e, D, EB, E), PREC)
                norm1 += tl.sum(a1 * a1, 1)
                a_dw1 += _tk_mm(a1, _tk_load_t(dw1 + e, D, EB, E), PREC)
                a_ds1 += _tk_mm(a1, _tk_load_t(ds1 + e, D, EB, E), PREC)
                # the scalar gradients of β_b, f_b, m_b (`_tk_state_bwd`), both layers' blocks
                kept0 = _tk_load(w0 + e * D, EB, D)
                kept1 = _tk_load(w1 + e, D, EB, E)
                if HAS_INIT:
                    kept0 -= _tk_load(i0 + e * D, EB, D)
                    kept1 -= _tk_load(i1 + e, D, EB, E)
                dw_0, dw_1 = _tk_load(dw0 + e * D, EB, D), _tk_load(dw1 + e, D, EB, E)
                s_0, s_1 = _tk_load(s0 + e * D, EB, D), _tk_load(s1 + e, D, EB, E)
                g_beta_l += tl.sum(tl.sum(dw_0 * kept0, 1), 0) + tl.sum(tl.sum(dw_1 * kept1, 1), 0)
                g_f_l += tl.sum(tl.sum(dw_0 * s_0, 1), 0) + tl.sum(tl.sum(dw_1 * s_1, 1), 0)
                g_m_l += tl.sum(tl.sum(_tk_load(ds0 + e * D, EB, D) * s_0, 1), 0)
                g_m_l += tl.sum(tl.sum(_tk_load(ds1 + e, D, EB, E) * s_1, 1), 0)
            # raw_1 (δ_1 = raw_1 r_1) waits in this chunk's rows of dv (written last), read back at each use
            rp = dv_ptr + tok * D
            raw1 = 2.0 * (pred + k - v)
            _tk_store(rp, raw1, C, D)
            _tk_store(xp, gs * _tk_mm_nt(q, k, PREC), C, C)
            tl.debug_barrier()  # by all threads before any reads them back
            r1 = 1.0 / (1.0 + norm1)
            d1 = raw1 * r1[:, None]
            gd1 = -g_last[:, None] * a_dw1 - n_last[:, None] * a_ds1
            g_g_last = -tl.sum(d1 * a_dw1, 1)
            g_n = -tl.sum(d1 * a_ds1, 1)
            # pass 2: layer 1's retrieval score
            score1 = tl.zeros((C, C), dtype=tl.float32)
            for e in range(0, E, EB):
                _, a1, _, _, zq = _tk_block_forward(qp, kp, rp, xp, w0 + e * D, s0 + e * D, i0 + e * D, w1 + e, r0,
                                                    beta, f, D, E, C, EB, ACT, HAS_INIT, PREC)  # fmt: skip
                score1 += _tk_mm_nt(_tk_act(zq, ACT), a1, PREC)
            dout = _tk_load(dp, C, D)
            g_score1 = -_tk_mm_nt(dout, d1, PREC)
            gd1 -= _tk_mm_tn(_tk_load(gp, C, C) * score1, _tk_load(dp, C, D), PREC)
            _tk_store(dg_ptr + tok * C, score1 * g_score1, C, C)  # G's gradient so far; layer 0's added below
            _tk_store(xs, _tk_load(gp, C, C) * g_score1, C, C)
            tl.debug_barrier()  # G ∘ g_score1 stored by all threads before they read it
            ga1_coef = 2.0 * tl.sum(gd1 * _tk_load(rp, C, D), 1) * r1 * r1  # D19 normalisation of δ_1
            g_raw1 = gd1 * r1[:, None]
            # pass 3
            g_q = _tk_load(dp, C, D)
            ga0 = tl.zeros((C, D), dtype=tl.float32)
            g_score0 = tl.zeros((C, C), dtype=tl.float32)
            ga0_coef = tl.zeros((C,), dtype=tl.float32)
            g_beta = tl.zeros((C,), dtype=tl.float32)
            g_f = tl.zeros((C,), dtype=tl.float32)
            for e in range(0, E, EB):
                z0, a1, carried0, d0, zq = _tk_block_forward(qp, kp, rp, xp, w0 + e * D, s0 + e * D, i0 + e * D,
                                                             w1 + e, r0, beta, f, D, E, C, EB, ACT, HAS_INIT, PREC)
                slope0 = _tk_act_grad(z0, ACT)
                raw0 = carried0 * slope0
                h1 = _tk_act(zq, ACT)
                # layer 1's retrieval, columns e: back from dout (`_tk_retrieve_bwd`, O = D, I = EB)
                back_w = _tk_mm(_tk_load(dp, C, D), _tk_load(w1 + e, D, EB, E), PREC)
                back_s = _tk_mm(_tk_load(dp, C, D), _tk_load(s1 + e, D, EB, E), PREC)
                g_h = f[:, None] * back_s + _tk_mm(_tk_load(xs, C, C), a1, PREC)
                if HAS_INIT:
                    back_i = _tk_mm(_tk_load(dp, C, D), _tk_load(i1 + e, D, EB, E), PREC)
                    back_w -= back_i
                    g_h += back_i
                g_h += beta[:, None] * back_w
                g_beta += tl.sum(h1 * back_w, 1)
                g_f += tl.sum(h1 * back_s, 1)
                dw_1 = _tk_load(dw1 + e, D, EB, E)
                g_w1 = _tk_mm_tn(beta[:, None] * _tk_load(dp, C, D), h1, PREC) + beta_l * dw_1
                _tk_store(gs1 + e, _tk_mm_tn(f[:, None] * _tk_load(dp, C, D), h1, PREC) + f_l * dw_1
                          + m_l * _tk_load(ds1 + e, D, EB, E), D, EB, E)  # fmt: skip
                if HAS_INIT:
                    g_i = _tk_mm_tn((1.0 - beta[:, None]) * _tk_load(dp, C, D), h1, PREC) + (1.0 - beta_l) * dw_1
                    g_i += _tk_load(di1 + e, D, EB, E)
                    tl.debug_barrier()
                    _tk_store(di1 + e, g_i, D, EB, E)
                # a_1's gradient: layer 1's retrieval score and chunk-end state, and δ_1's normalisation
                ga1 = _tk_mm_tn(_tk_load(xs, C, C), h1, PREC) - ga1_coef[:, None] * a1
                ga1 -= _tk_mm(_tk_load(rp, C, D) * (r1 * g_last)[:, None], dw_1, PREC)
                ga1 -= _tk_mm(_tk_load(rp, C, D) * (r1 * n_last)[:, None], _tk_load(ds1 + e, D, EB, E), PREC)
                # layer 0's retrieval, rows e: back from dz = g_h σ'(zq)
                dz = g_h * _tk_act_grad(zq, ACT)
                back_w = _tk_mm(dz, _tk_load(w0 + e * D, EB, D), PREC)
                back_s = _tk_mm(dz, _tk_load(s0 + e * D, EB, D), PREC)
                g_q += f[:, None] * back_s
                if HAS_INIT:
                    back_i = _tk_mm(dz, _tk_load(i0 + e * D, EB, D), PREC)
                    back_w -= back_i
                    g_q += back_i
                g_q += beta[:, None] * back_w
                g_beta += tl.sum(_tk_load(qp, C, D) * back_w, 1)
                g_f += tl.sum(_tk_load(qp, C, D) * back_s, 1)
                dw_0 = _tk_load(dw0 + e * D, EB, D)
                ds_0 = _tk_load(ds0 + e * D, EB, D)
                g_w0 = _tk_mm_tn(beta[:, None] * dz, _tk_load(qp, C, D), PREC) + beta_l * dw_0
                g_s0 = _tk_mm_tn(f[:, None] * dz, _tk_load(qp, C, D), PREC) + f_l * dw_0 + m_l * ds_0
                _tk_store(gs0 + e * D, g_s0, EB, D)
                if HAS_INIT:
                    g_i = _tk_mm_tn((1.0 - beta[:, None]) * dz, _tk_load(qp, C, D), PREC) + (1.0 - beta_l) * dw_0
                    g_i += _tk_load(di0 + e * D, EB, D)
                    tl.debug_barrier()
                    _tk_store(di0 + e * D, g_i, EB, D)
                g_score0 -= _tk_mm_nt(dz, d0, PREC)
                # δ_0's gradient: layer 0's retrieval and chunk-end state
                a_dw = _tk_mm(_tk_load(kp, C, D), _tk_load_t(dw0 + e * D, EB, D), PREC)
                a_ds = _tk_mm(_tk_load(kp, C, D), _tk_load_t(ds0 + e * D, EB, D), PREC)
                gd0 = -g_last[:, None] * a_dw - n_last[:, None] * a_ds
                gd0 -= _tk_mm_tn(_tk_load(xp, C, C), dz, PREC)
                g_g_last -= tl.sum(d0 * a_dw, 1)
                g_n -= tl.sum(d0 * a_ds, 1)
                ga0 -= _tk_mm(d0 * g_last[:, None], dw_0, PREC) + _tk_mm(d0 * n_last[:, None], ds_0, PREC)
                ga0_coef += tl.sum(gd0 * raw0, 1)
                # δ_0 = (raw_1 W_1) ∘ σ'(z_0) r_0
                g_raw0 = gd0 * r0[:, None]
                g_carried = g_raw0 * slope0
                g_raw1 += _tk_mm(g_carried, _tk_load_t(w1 + e, D, EB, E), PREC)
                g_w1 += _tk_mm_tn(_tk_load(rp, C, D), g_carried, PREC)
                _tk_store(x + e, ga1 * slope0 + g_raw0 * carried0 * _tk_act_grad2(z0, ACT), C, EB, E)
                _tk_store(gw0 + e * D, g_w0, EB, D)
                _tk_store(gw1 + e, g_w1, D, EB, E)
            tl.debug_barrier()  # the stores before and in pass 3 (G's gradient, x, W's) by all threads, then read
            g_g = _tk_mm_nt(_tk_load(qp, C, D), _tk_load(kp, C, D), PREC) * g_score0
            g_g += _tk_load(dg_ptr + tok * C, C, C)
            g_score0 = _tk_load(gp, C, C) * g_score0
            g_q += _tk_mm(g_score0, _tk_load(kp, C, D), PREC)
            ga0 += _tk_mm_tn(g_score0, _tk_load(qp, C, D), PREC)
            ga0 -= (2.0 * ga0_coef * r0 * r0)[:, None] * _tk_load(kp, C, D)
            g_pred = 2.0 * g_raw1
            g_k = g_pred + ga0
            # pass 4: the gradient of z_0 through δ_1 (the prediction on the keys) and what it reaches
            for e in range(0, E, EB):
                z0 = _tk_mm(_tk_load(kp, C, D), _tk_load_t(w0 + e * D, EB, D), PREC)
                dz0 = _tk_load(x + e, C, EB, E) + _tk_mm(g_pred, _tk_load(w1 + e, D, EB, E), PREC) * _tk_act_grad(
                    z0, ACT)
                g_w1 = _tk_load(gw1 + e, D, EB, E) + _tk_mm_tn(g_pred, _tk_act(z0, ACT), PREC)
                g_w0 = _tk_load(gw0 + e * D, EB, D) + _tk_mm_tn(dz0, _tk_load(kp, C, D), PREC)
                g_k += _tk_mm(dz0, _tk_load(w0 + e * D, EB, D), PREC)
                tl.debug_barrier()
                _tk_store(gw1 + e, g_w1, D, EB, E)
                _tk_store(gw0 + e * D, g_w0, EB, D)
            _tk_store_chunk_grads(dq_ptr, dk_ptr, dv_ptr, dg_ptr, dnl_ptr, dbeta_ptr, df_ptr, dm_ptr, tok, g_q, g_k,
                                  -g_pred, g_g, g_g_last, g_n, g_beta, g_f, g_beta_l, g_f_l, g_m_l, D, C)  # fmt: skip
            tl.debug_barrier()  # slot c % 2 written by all threads before chunk c - 1 reads it


def _triton_args(depth, layers, placeholder):
    """Pointers of layer 1 for depth 1 are never read: any tensor will do."""
    return layers if depth == 2 else (*layers, *([placeholder] * (2 - len(layers))))


def _triton_scan_forward(weights, momentum, initial, sequence, chunk_size, activation, keep_states):
    """Fused forward scan. Returns (outputs, final weights, final momentum, boundary states or None); the boundary
    states are the (n_chunks + 1, B, H, d_out, d_in) buffers per layer, slot c = state at the start of chunk c."""
    # the first launch of a configuration compiles it (minutes for forward + backward at d=64, E=128)
    logger.warning_once(
        "Titans: the memory scan runs as fused Triton kernels; their first use on a machine compiles them (up to a "
        "few minutes, then cached on disk by Triton). TITANS_MEMORY_KERNEL=torch uses the PyTorch scan instead."
    )
    q, k, v, g, n_last, beta, f, m = (t.contiguous() for t in sequence)
    depth, (B, H, T, D) = len(weights), q.shape
    n_chunks = T // chunk_size
    E = weights[0].shape[-2] if depth == 2 else D
    slots = n_chunks + 1 if keep_states else 2
    states_w, states_s = [], []
    for w, s in zip(weights, momentum):
        buf_w = q.new_empty(slots, B, H, *w.shape[-2:])
        buf_s = q.new_empty(slots, B, H, *s.shape[-2:])
        buf_w[0] = w
        buf_s[0] = s
        states_w.append(buf_w)
        states_s.append(buf_s)
    init = [t.contiguous() for t in initial] if initial else [q] * depth
    out = torch.empty_like(q)
    w_args = _triton_args(depth, states_w, q)
    s_args = _triton_args(depth, states_s, q)
    i_args = _triton_args(depth, init, q)
    pointers = (q, k, v, g, n_last, beta, f, m, w_args[0], s_args[0], i_args[0], w_args[1], s_args[1], i_args[1], out)
    sizes = (n_chunks, H, slots, B * H)
    constants = _triton_constants(depth, D, E, chunk_size, activation, bool(initial))
    launch = dict(num_warps=_triton_warps(E), num_stages=1)
    if "EB" not in constants:
        _tk_scan_fwd[(B * H,)](*pointers, *sizes, **constants, **launch)
    else:  # scratch per program: layer 0's retrieval scores (C x C)
        scores = q.new_empty(B * H, chunk_size, chunk_size)
        _tk_scan_fwd_blocked[(B * H,)](*pointers, scores, *sizes, **constants, **launch)
    last = n_chunks % slots
    final_w = tuple(b[last].clone() for b in states_w)
    final_s = tuple(b[last].clone() for b in states_s)
    return out, final_w, final_s, ((states_w, states_s) if keep_states else None)



def _triton_scan_backward(boundaries, initial, sequence, grad_out, grad_w, grad_s, chunk_size, activation):
    """Fused backward scan from the forward's boundary buffers. Returns the gradients of (weights, momentum) at the
    scan start (batch B), of `initial` (batch 1, summed over the batch) and of the 8 sequence inputs."""
    states_w, states_s = boundaries
    q, k, v, g, n_last, beta, f, m = (t.contiguous() for t in sequence)
    depth, (B, H, T, D) = len(states_w), q.shape
    n_chunks = T // chunk_size
    E = states_w[0].shape[-2] if depth == 2 else D
    scratch_w, scratch_s = [], []
    for buf, grad in zip((*states_w, *states_s), (*grad_w, *grad_s)):
        scratch = q.new_zeros(2, *buf.shape[1:])
        if grad is not None:
            scratch[n_chunks % 2] = grad
        (scratch_w if len(scratch_w) < depth else scratch_s).append(scratch)
    grad_init = [q.new_zeros(B, H, *t.shape[-2:]) for t in initial] if initial else [q] * depth
    init = [t.contiguous() for t in initial] if initial else [q] * depth
    grads = [torch.empty_like(t) for t in (q, k, v, g, n_last, beta, f, m)]
    w_args, s_args = _triton_args(depth, states_w, q), _triton_args(depth, states_s, q)
    i_args, di_args = _triton_args(depth, init, q), _triton_args(depth, grad_init, q)
    dw_args, ds_args = _triton_args(depth, scratch_w, q), _triton_args(depth, scratch_s, q)
    grad_out = q.new_zeros(()).expand_as(q).contiguous() if grad_out is None else grad_out.contiguous()
    args = (q, k, v, g, n_last, beta, f, m, w_args[0], s_args[0], i_args[0], w_args[1], s_args[1], i_args[1],
            grad_out, dw_args[0], ds_args[0], dw_args[1], ds_args[1], di_args[0], di_args[1], *grads)  # fmt: skip
    constants = _triton_constants(depth, D, E, chunk_size, activation, bool(initial))
    launch = dict(num_warps=_triton_warps(E), num_stages=1)
    if "EB" not in constants:
        _tk_scan_bwd[(B * H,)](*args, n_chunks, H, B * H, **constants, **launch)
    else:  # scratch per program: the z_0 gradients parked between passes 3 and 4 (C x E), then two C x C tiles
        parked = q.new_empty(B * H, chunk_size * (E + 2 * chunk_size))
        _tk_scan_bwd_blocked[(B * H,)](*args, parked, n_chunks, H, B * H, **constants, **launch)
    grad_initial = tuple(t.sum(0, keepdim=True) for t in grad_init) if initial else ()
    return tuple(t[0] for t in scratch_w), tuple(t[0] for t in scratch_s), grad_initial, grads


class _CausalDepthwiseConv(torch.autograd.Function):
    """The ShortConv of §4.4 as K shifted multiply-adds in the (B, T, C) layout: out[:, t] = Σ_j w[j] ⊙ x[:, t + j]
    over the input padded with the K-1 positions before it, the taps w as (K, C) (`memory_qkv_activations`).
    F.conv1d wants channels first, and its transposed copies and a SiLU (and its backward) over a strided output made
    a MAG training step 5 % slower on CPU (A/B at 4 × 1,024). Sums run in fp32 for half-precision inputs."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:  # (B, T+K-1, C), (K, C)
        steps = padded.shape[1] - taps.shape[0] + 1
        ctx.taps_dtype = taps.dtype
        taps = taps.to(torch.promote_types(padded.dtype, torch.float32))
        out = padded[:, :steps] * taps[0]
        for j in range(1, taps.shape[0]):
            out.addcmul_(padded[:, j : j + steps], taps[j])
        ctx.save_for_backward(padded, taps)
        return out.to(padded.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded, taps = ctx.saved_tensors
        steps, grad = grad.shape[1], grad.to(taps.dtype)
        grad_padded = grad_taps = None
        if ctx.needs_input_grad[0]:
            grad_padded = torch.zeros(padded.shape, dtype=taps.dtype, device=padded.device)
            for j in range(taps.shape[0]):
                grad_padded[:, j : j + steps].addcmul_(grad, taps[j])
            grad_padded = grad_padded.to(padded.dtype)
        if ctx.needs_input_grad[1]:
            rows = [(grad * padded[:, j : j + steps]).sum((0, 1)) for j in range(taps.shape[0])]
            grad_taps = torch.stack(rows).to(ctx.taps_dtype)
        return grad_padded, grad_taps


# The memory's elementwise work, as functions of tensors (parameters passed in), so that under
# TITANS_MEMORY_KERNEL=compile one graph per function serves every layer (`_maybe_compiled`). Eager, each is the
# reference; compiled, inductor fuses it and recomputes what is cheap in the backward.


def _split_heads(x: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:  # (B, T, H·d) -> (B, H, T, d)
    return x.view(*x.shape[:2], num_heads, -1).transpose(1, 2).to(dtype)


def memory_qkv_activations(padded, conv_taps, num_heads, dtype, value_norm):
    """q, k, v = SiLU(ShortConv(x W)), q/k (and v, D5) ℓ2-normalised per head (§4.4): (B, H, T, d) each, from the
    projections x W (B, T, 3·H·d) preceded by the K-1 projections before them (the conv state). `conv_taps` is the
    conv weight transposed, (K, 3·H·d): contiguous, tap j is a unit-stride row that inductor loads as vectors (a
    strided (C, K) load left the compiled conv and SiLU scalar, 3.5x slower forward)."""
    if conv_taps is None:
        out = padded
    elif padded.shape[1] == conv_taps.shape[0]:  # one token (decoding): one product and sum per channel
        out = (padded * conv_taps).sum(1, keepdim=True)
    elif torch.compiler.is_compiling():  # the same K shifted multiply-adds, differentiated by the compiler
        steps = padded.shape[1] - conv_taps.shape[0] + 1
        taps = conv_taps.to(torch.promote_types(padded.dtype, torch.float32))
        out = sum(padded[:, j : j + steps] * taps[j] for j in range(taps.shape[0])).to(padded.dtype)
    else:
        out = _CausalDepthwiseConv.apply(padded, conv_taps)
    heads = F.silu(out).view(*out.shape[:2], 3 * num_heads, -1).to(dtype)  # (B, T, 3H, d): q, k, v heads in turn
    if value_norm:  # bounded regression targets keep long streams finite (model card D5); one norm for all three
        return F.normalize(heads, dim=-1).transpose(1, 2).chunk(3, dim=1)
    q, k = F.normalize(heads[:, :, : 2 * num_heads], dim=-1).transpose(1, 2).chunk(2, dim=1)
    return q, k, heads[:, :, 2 * num_heads :].transpose(1, 2)


def memory_gates(lr_logit, forget_logit, eta_logit, bias, max_lr, dtype):
    """θ_t, log η_t, log(1 - α_t) from their projections (None: that gate is ablated), stacked as (B, H, T, 3)."""
    bias = bias.to(dtype)
    lr = max_lr * torch.sigmoid(lr_logit.to(dtype) + bias[0])
    if forget_logit is not None:
        log_keep = F.logsigmoid(-(forget_logit.to(dtype) + bias[1]))
    else:
        log_keep = torch.zeros_like(lr)
    if eta_logit is not None:
        eta_logit = eta_logit.to(dtype) + bias[2]
        log_eta = F.logsigmoid(eta_logit)
        # θ_t scaled by (1 - η_t) (model card D18): momentum then averages the surprise instead of summing it,
        # so a chunk moves the memory by at most Σθ, never Σθ/(1 - η), whatever η the outer training learns.
        lr = lr * torch.sigmoid(-eta_logit)
    else:  # η = 0 (ablation): a large negative log keeps the closed form finite and exact
        log_eta = torch.full_like(lr, -1e4)
    return torch.stack([lr, log_eta, log_keep], dim=-1).transpose(1, 2)


def memory_output_gate(y, g, norm_weight, eps):
    """RMSNorm(y) per head ⊙ SiLU(g) (§4.4's output normalisation and gate), heads merged: (B, T, H, d) and the
    gate projection (B, T, H·d) -> (B, T, H·d), ready for the output projection."""
    return (rms_norm(y, norm_weight, eps) * F.silu(g).view(y.shape)).flatten(2)


def memory_read(q, g, weights, norm_weight, eps, activation, num_heads, dtype):
    """MAC's read-out M*(q) (Eq. 21) from the query and gate projections, up to the output projection."""
    q = F.normalize(_split_heads(F.silu(q), num_heads, dtype), dim=-1)
    return memory_output_gate(memory_apply(weights, q, activation).transpose(1, 2).to(g.dtype), g, norm_weight, eps)


def memory_gate(y, memory_out, y_weight, y_eps, memory_weight, memory_eps):
    """⊗ of Eq. 25/28: both branches normalised with learnable weights, then a sigmoid gate."""
    return rms_norm(y, y_weight, y_eps) * torch.sigmoid(rms_norm(memory_out, memory_weight, memory_eps))


def _compact(x: torch.Tensor, valid: torch.Tensor):
    """Move each row's valid (non-padding) positions to the front, keeping their order. Returns (x', perm)."""
    perm = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    return _gather_time(x, perm), perm


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, t], ...] for x of shape (B, T, ...)."""
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


class TitansMemoryState:
    """Everything the memory of one layer needs to continue a stream (held by `TitansCache`, batch first).

    weights / momentum: M and S at the last chunk boundary, one tensor per memory layer, (B, H, d_out, d_in), fp32.
    buffer_{k,v,gates}: keys, values and (θ, log η, log(1-α)) of the tokens since that boundary, (B, H, b, ·);
    buffer_length (B,) says how many slots are real. conv: the last K-1 pre-convolution q/k/v projections.
    current_weights / current_momentum: M_t and S_t after the last buffered token, kept by one-token decoding steps
    (None until the first one: they are recomputed from the boundary state and the buffer when needed).
    """

    _FIELDS = (
        "weights", "momentum", "buffer_k", "buffer_v", "buffer_gates", "buffer_length", "conv",
        "current_weights", "current_momentum",
    )  # fmt: skip

    def __init__(
        self, weights, momentum, buffer_k, buffer_v, buffer_gates, buffer_length, conv,
        current_weights=None, current_momentum=None,
    ):  # fmt: skip
        self.weights, self.momentum = tuple(weights), tuple(momentum)
        self.buffer_k, self.buffer_v, self.buffer_gates = buffer_k, buffer_v, buffer_gates
        self.buffer_length, self.conv = buffer_length, conv
        self.current_weights = tuple(current_weights) if current_weights else None
        self.current_momentum = tuple(current_momentum) if current_momentum else None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self._FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                out.update({f"{name}.{i}": t for i, t in enumerate(value)})
            elif value is not None:
                out[name] = value
        return out

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TitansMemoryState":
        for name in self._FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, tuple(fn(t) for t in value))
            elif value is not None:
                setattr(self, name, fn(value))
        return self


class TitansNeuralMemory(nn.Module):
    """Neural long-term memory (paper §3.1-3.2, block of §4.4).

    q/k/v = SiLU(ShortConv(x W_{Q,K,V})), q and k ℓ2-normalised per head; per-token, per-head inner learning rate
    θ_t, momentum η_t and forgetting α_t = sigmoid(Linear(x_t)); memory = H independent MLPs of depth L_M whose
    initial weights are learned; output = o_proj(RMSNorm(y) ⊙ SiLU(g_proj(x))) (GSS-style gate, §4.4).
    Parameters per layer: 4·D·H·d (q, k, v, gate) + H·d·D (out) + 3·D·H (gates) + H·|M| + 3·H·d·K (conv).
    """

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_memory_heads
        self.head_dim = config.memory_head_dim
        self.chunk_size = config.memory_chunk_size
        self.conv_size = config.memory_conv_size
        self.activation = config.memory_activation
        inner = self.num_heads * self.head_dim

        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.lr_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.forget_proj = (
            nn.Linear(config.hidden_size, self.num_heads, bias=False) if config.memory_use_forgetting else None
        )
        self.momentum_proj = (
            nn.Linear(config.hidden_size, self.num_heads, bias=False) if config.memory_use_momentum else None
        )
        self.output_norm = TitansRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # Direct parameters (initialised in `_init_weights`): gate biases (θ, α, η), depthwise conv, and the
        # learned initial memory weights M_0 per head.
        self.gate_bias = nn.Parameter(torch.zeros(3, self.num_heads))
        self.conv_weight = nn.Parameter(torch.zeros(3 * inner, max(self.conv_size, 1))) if self.conv_size else None
        dims = [self.head_dim] + [config.memory_hidden_dim] * (config.memory_depth - 1) + [self.head_dim]
        self.memory_weights = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.num_heads, dims[i + 1], dims[i])) for i in range(config.memory_depth)]
        )

    # -- projections --------------------------------------------------------------------------------------------
    @property
    def state_dtype(self) -> torch.dtype:
        # the inner optimisation runs in fp32 even when the model is bf16/fp16 (fp64 stays fp64)
        return torch.float64 if self.memory_weights[0].dtype == torch.float64 else torch.float32

    def _gates(self, x: torch.Tensor):
        """θ_t, log η_t, log(1 - α_t): per token and head, (B, H, T) in fp32 (Eq. 13-14 made data-dependent)."""
        logits = [None if p is None else p(x) for p in (self.lr_proj, self.forget_proj, self.momentum_proj)]
        gates = _maybe_compiled(memory_gates, x.shape[1])
        return gates(*logits, self.gate_bias, self.config.memory_max_lr, self.state_dtype)

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # y: (B, T, H, d)
        norm = self.output_norm
        gate = _maybe_compiled(memory_output_gate, x.shape[1])
        gated = gate(y.to(x.dtype), self.g_proj(x), norm.weight, norm.variance_epsilon)
        return self.o_proj(gated)

    def _batch_weights(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """M_0 of every row: the learned initial weights, copied per row rather than expanded (the compiled chunk
        and read-out functions specialise on strides: a stride-0 batch dim compiled each of them twice)."""
        return tuple(w.to(self.state_dtype).expand(batch_size, *w.shape).contiguous() for w in self.memory_weights)

    def initial_state(self, batch_size: int, device, dtype=torch.float32) -> TitansMemoryState:
        weights = self._batch_weights(batch_size)
        inner = self.num_heads * self.head_dim
        zeros = lambda *s: torch.zeros(*s, device=device, dtype=self.state_dtype)  # noqa: E731
        return TitansMemoryState(
            weights=weights,
            momentum=tuple(torch.zeros_like(w) for w in weights),
            buffer_k=zeros(batch_size, self.num_heads, self.chunk_size, self.head_dim),
            buffer_v=zeros(batch_size, self.num_heads, self.chunk_size, self.head_dim),
            buffer_gates=zeros(batch_size, self.num_heads, self.chunk_size, 3),
            buffer_length=torch.zeros(batch_size, dtype=torch.long, device=device),
            conv=torch.zeros(batch_size, max(self.conv_size - 1, 0), 3 * inner, device=device, dtype=dtype),
        )

    def read(self, q: torch.Tensor, g: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """MAC's h_t = M*_{t-1}(q_t) (Eq. 21): read a given memory state, no update, from the query and gate
        projections of x (`q_proj(x)`, `g_proj(x)`: MAC projects all its segments at once)."""
        norm = self.output_norm
        read = _maybe_compiled(memory_read, q.shape[1])(
            q, g, weights, norm.weight, norm.variance_epsilon, self.activation, self.num_heads, self.state_dtype
        )
        return self.o_proj(read)

    def _qkv(self, x: torch.Tensor, conv_state: torch.Tensor | None):
        """q, k, v = SiLU(ShortConv(x W)), q/k (and v, D5) ℓ2-normalised per head (§4.4): (B, H, T, d) each."""
        size = _piece_length(x[:, :1].numel(), x.device)
        if conv_state is None and x.shape[1] > size:  # long input: by time pieces (`_PIECE_ELEMENTS`), each piece's
            pieces, state = [], None  # conv state being the last K-1 projections of the pieces before it
            for piece in x.split(size, dim=1):
                *qkv, state = self._qkv(piece, state)
                pieces.append(qkv)
                state = None if state is None else state[:, state.shape[1] - self.conv_size + 1 :]
            return *(torch.cat(t, dim=2) for t in zip(*pieces)), None
        projected = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        # elementwise work: recompute rather than store (compiled, the graph's own partition already does)
        if torch.is_grad_enabled() and projected.requires_grad and not _use_compiled_memory():
            return checkpoint(self._qkv_from_projection, projected, conv_state, use_reentrant=False)
        return self._qkv_from_projection(projected, conv_state)

    def _qkv_from_projection(self, projected: torch.Tensor, conv_state: torch.Tensor | None):
        """(q, k, v, conv input): the conv input (conv state + projections) gives the next conv state."""
        if self.conv_weight is None:
            padded = weight = None
        else:
            if conv_state is None:
                conv_state = projected.new_zeros(projected.shape[0], self.conv_size - 1, projected.shape[-1])
            padded, weight = torch.cat([conv_state.to(projected.dtype), projected], dim=1), self.conv_weight.t()
            if projected.shape[1] > 1:  # the taps as a (K, C) copy (`memory_qkv_activations`); a decoding step
                weight = weight.contiguous()  # multiplies them once, as the strided view
        q, k, v = _maybe_compiled(memory_qkv_activations, projected.shape[1])(
            projected if padded is None else padded, None if weight is None else weight.to(projected.dtype),
            self.num_heads, self.state_dtype, self.config.memory_value_norm,
        )  # fmt: skip
        return q, k, v, padded

    def _initial_weights(self) -> tuple[torch.Tensor, ...]:
        return tuple(w.to(self.state_dtype).unsqueeze(0) for w in self.memory_weights)

    def _current(self, state: TitansMemoryState):
        """M_t, S_t after the buffered tokens, by the chunk form over the open chunk. Slots past a row's end must not
        move what is read: with θ = 0, α = 0 and η = 0 they keep M (S is zeroed), with η = 1 they keep S (M would
        drift by S at each slot), so the two are read from two passes."""
        if state.current_weights is not None:
            return state.current_weights, state.current_momentum
        b = self.chunk_size
        beyond = torch.arange(b, device=state.buffer_k.device)[None, None, :] >= state.buffer_length[:, None, None]
        lr, log_eta, log_keep = state.buffer_gates.masked_fill(beyond[..., None], 0.0).unbind(-1)
        run = lambda log_eta: memory_scan(  # noqa: E731
            state.weights, state.momentum, torch.zeros_like(state.buffer_k), state.buffer_k, state.buffer_v,
            lr, log_eta, log_keep, b, self.activation, initial=self._initial_weights(),
        )  # fmt: skip
        weights = run(log_eta.masked_fill(beyond, -1e4))[1]
        momentum = run(log_eta)[2]
        return weights, momentum

    def _decode_step(self, x: torch.Tensor, state: TitansMemoryState):
        """One new token per row (generation), O(|M|) instead of re-running the open chunk: the token recurrence
        S_t = η_t S_{t-1} - θ_t u_t (Eq. 14), M_t = (1-α_t) M_{t-1} + α_t M_init + S_t (Eq. 13, D7), with u_t taken at
        the chunk-start weights (Eq. 16), exactly as the chunk form does. The chunk closes when the buffer is full."""
        current_w, current_s = self._current(state)
        update, buffers = type(self)._decode_update, (state.buffer_k, state.buffer_v, state.buffer_gates)
        conv = state.conv
        # compiled for generation only: in training, one-token calls are rare (MAC slices of a padded batch) and a
        # graph with autograd would be a second compile and a compiled backward for them
        if _use_compiled_memory() and not torch.is_grad_enabled():
            # prefill leaves the buffers and conv state as strided slices: one layout, one graph
            update, buffers, conv = _compiled_decode_update(), tuple(map(_contiguous, buffers)), _contiguous(conv)
        out, new_w, new_s, closed, *buffers = update(
            self, x, state.weights, current_w, current_s, *buffers, state.buffer_length, conv
        )  # fmt: skip
        if torch.compiler.is_compiling() or bool(closed.any()):  # a closed chunk's end is the next boundary; `where`
            at = closed.view(-1, 1, 1, 1)  # copies, so it never aliases current_weights (aliases cost a second graph)
            weights = tuple(torch.where(at, n, o) for n, o in zip(new_w, state.weights))
            momentum = tuple(torch.where(at, n, o) for n, o in zip(new_s, state.momentum))
        else:
            weights, momentum = state.weights, state.momentum
        return out, TitansMemoryState(weights, momentum, *buffers, current_weights=new_w, current_momentum=new_s)

    def _decode_update(self, x, weights, current_w, current_s, buffer_k, buffer_v, buffer_gates, length, conv):
        """The tensor work of `_decode_step`, free of data-dependent Python branches so that one graph serves every
        step under TITANS_MEMORY_KERNEL=compile (`_compiled_decode_update`)."""
        q, k, v, conv_in = self._qkv(x, conv)
        gates = self._gates(x)  # (B, H, 1, 3)
        lr, eta, keep = gates[..., 0, None], gates[..., 1, None].exp(), gates[..., 2, None].exp()  # (B, H, 1, 1)
        inputs, deltas = memory_gradient_factors(weights, k, v, self.activation)
        new_s, new_w = [], []
        with _autocast_off():
            for layer, init in enumerate(self._initial_weights()):
                # η_t S - θ_t u_t with u_t = δ_t a_tᵀ: the outer product accumulated by one batched baddbmm, in
                # place on the fresh η_t S (out of place, baddbmm copies its input: one more pass over S)
                pairs = ((deltas[layer] * lr).flatten(0, 1).transpose(1, 2), inputs[layer].flatten(0, 1))
                s = (eta * current_s[layer]).flatten(0, 1).baddbmm_(*pairs, alpha=-1).view_as(current_s[layer])
                new_s.append(s)
                new_w.append(torch.lerp(init, current_w[layer], keep).add_(s))  # (1-α_t) M + α_t M_init + S_t
        out = self._output(memory_apply(new_w, q, self.activation).transpose(1, 2), x)

        slot = length.view(-1, 1, 1, 1)
        put = lambda buffer, t: buffer.scatter(2, slot.expand(*t.shape[:2], 1, t.shape[-1]), t)  # noqa: E731
        length = length + 1
        closed = length == self.chunk_size
        return (
            out,
            tuple(new_w),
            tuple(new_s),
            closed,
            put(buffer_k, k),
            put(buffer_v, v),
            put(buffer_gates, gates),
            length.masked_fill(closed, 0),
            conv_in[:, 1:] if conv_in is not None else conv,
        )

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None = None,
        state: TitansMemoryState | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, TitansMemoryState | None]:
        """Write x into the memory token by token (Eq. 13-14) and read each token's output y_t = M_t(q_t) (Eq. 15).

        `valid` (B, T) marks real tokens; padding never writes into the memory: each row is compacted so that its
        chunk boundaries count real tokens only. With a `state` (cache, or MAC's next segment), the stream continues
        exactly where it stopped, whatever the split of the input into calls.
        """
        bsz, seq_len, _ = x.shape
        b = self.chunk_size
        if state is not None and seq_len == 1 and (valid is None or _holds_everywhere(valid)):
            return self._decode_step(x, state)
        fast = valid is None and state is None and not return_state
        fresh = state is None  # no open chunk to continue: known without reading its length (also when traced)
        if fast:
            xc, perm, count = x, None, None
        else:
            if valid is None:
                valid = torch.ones(bsz, seq_len, dtype=torch.bool, device=x.device)
            # rows without padding need no compaction (the common case, e.g. MAC segments in training)
            xc, perm = (x, None) if _holds_everywhere(valid) else _compact(x, valid)
            count = valid.sum(1)
            if state is None:
                state = self.initial_state(bsz, x.device, x.dtype)

        q, k, v, conv_in = self._qkv(xc, None if fast else state.conv)
        gates = self._gates(xc)  # (B, H, T, 3)

        if fast:
            weights = self._batch_weights(bsz)
            momentum = tuple(torch.zeros_like(w) for w in weights)
            offset, total, select = 0, None, None
        else:
            # [buffered tokens of the open chunk | new real tokens], per row shifted so both are contiguous
            buffer_len = state.buffer_length
            if fresh or _holds_everywhere(buffer_len == buffer_len[0]):  # same phase in every row: concatenation
                n = 0 if fresh else int(buffer_len[0])
                def join(old, new):
                    return new if n == 0 else torch.cat([old[:, :, :n], new], dim=2)
            else:
                slots = torch.arange(b + seq_len, device=x.device)
                source = torch.where(slots[None] < buffer_len[:, None], slots[None], slots[None] + b - buffer_len[:, None])
                source = source.clamp(max=b + seq_len - 1)
                join = lambda old, new: _gather_time(torch.cat([old, new], dim=2).transpose(1, 2), source).transpose(1, 2)  # noqa: E731
            q = join(state.buffer_k.new_zeros(()).expand_as(state.buffer_k), q)
            k, v, gates = join(state.buffer_k, k), join(state.buffer_v, v), join(state.buffer_gates, gates)
            total = buffer_len + count
            weights, momentum, offset = state.weights, state.momentum, buffer_len
            select = total // b

        # pad to whole chunks with neutral tokens (θ = 0, η = 1, α = 0): they never precede a real token
        # (traced: every slot, the rows' ends being masked below; eager: up to the longest row)
        length = q.shape[2] if total is None or torch.compiler.is_compiling() else max(int(total.max()), 1)
        padded = -(-length // b) * b
        if length < q.shape[2]:  # (a full-length slice would still cost a zero-filled gradient in the backward)
            q, k, v, gates = (t[:, :, :length] for t in (q, k, v, gates))
        if padded > length:
            pad = padded - length
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            gates = F.pad(gates, (0, 0, 0, pad))
        # every row ends where the padded sequence does (e.g. MAC segments in training): nothing to mask or select
        whole_chunks = not fast and _holds_everywhere(total == padded)
        if not fast and not whole_chunks:  # neutralise everything past each row's real tokens
            beyond = torch.arange(padded, device=x.device)[None, None, :, None] >= total[:, None, None, None]
            gates = gates.masked_fill(beyond, 0.0)
        initial = self._initial_weights()
        out, new_w, new_s = memory_scan(
            weights, momentum, q, k, v, gates[..., 0], gates[..., 1], gates[..., 2], b, self.activation,
            None if fast or whole_chunks or not return_state else select, initial,
        )  # fmt: skip

        if fast:
            out = out[:, :, :seq_len] if padded > seq_len else out
            return _position_wise(self._output, out.transpose(1, 2), x), None

        # outputs of the new tokens back to their original slots
        if padded >= seq_len and (fresh or _holds_everywhere(offset == 0)):
            out = out[:, :, :seq_len].transpose(1, 2)  # (B, T, H, d), compacted order
        else:
            index = (offset[:, None] + torch.arange(seq_len, device=x.device)[None]).clamp(max=padded - 1)
            out = _gather_time(out.transpose(1, 2), index)
        if perm is not None:
            out = _gather_time(out, torch.argsort(perm, dim=1))
        result = _position_wise(self._output, out, x) * valid[..., None].to(x.dtype)
        if not return_state:  # (a padded batch without a cache: the outputs only)
            return result, None

        # open chunk of each row -> new buffer; last K-1 real projections -> new conv state. Where every row closes its
        # chunk (buffers empty) or holds the same number of tokens, slices replace the gathers: gather keeps its
        # whole input alive for the backward (MAC: the conv input of every segment)
        if whole_chunks:
            buffer_k, buffer_v, buffer_gates = (torch.zeros_like(t) for t in (state.buffer_k, state.buffer_v, state.buffer_gates))
        else:
            start = (select * b)[:, None] + torch.arange(b, device=x.device)[None]
            start = start.clamp(max=padded - 1)
            take = lambda t: _gather_time(t.transpose(1, 2), start).transpose(1, 2)  # noqa: E731
            buffer_k, buffer_v, buffer_gates = take(k), take(v), take(gates)
        if conv_in is None:
            conv = state.conv
        elif _holds_everywhere(count == count[0]):
            conv = conv_in[:, int(count[0]) : int(count[0]) + self.conv_size - 1].clone()  # not a view: see above
        else:
            conv = _gather_time(conv_in, count[:, None] + torch.arange(self.conv_size - 1, device=x.device)[None])
        new_state = TitansMemoryState(
            weights=new_w,
            momentum=new_s,
            buffer_k=buffer_k,
            buffer_v=buffer_v,
            buffer_gates=buffer_gates,
            buffer_length=total - select * b,
            conv=conv,
        )
        return result, new_state


# ----------------------------------------------------------------------------------------------------------------
# Attention: sliding window (MAG, MAL, layers without memory) or MAC segments, with persistent tokens (§3.3)
# ----------------------------------------------------------------------------------------------------------------


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def titans_attention_mask(q_pos, kv_pos, num_cached, num_persistent, window=None, segment=None, lookback=None):
    """Boolean (B, 1, Lq, Np + Lk) mask from absolute token positions (-1 marks padding).

    Positions count real tokens per row, so left padding and per-row phases (batched generation) are exact.
    Persistent tokens are visible to every query; a padding query sees only itself (its output is discarded).
    """
    q, kv = q_pos[:, :, None], kv_pos[:, None, :]
    allowed = (kv >= 0) & (kv <= q)
    if window is not None:
        allowed &= q - kv < window
    if segment is not None:  # MAC: causal attention inside the segment (Fig. 3a)
        allowed &= torch.div(kv, segment, rounding_mode="floor") == torch.div(q, segment, rounding_mode="floor")
    if lookback is not None:
        allowed &= q - kv < lookback
    q_len = q_pos.shape[1]
    slots = torch.arange(kv_pos.shape[1], device=q_pos.device)
    own = slots[None, :] == torch.arange(q_len, device=q_pos.device)[:, None] + num_cached  # query i <-> its own slot
    allowed |= own[None] & (q < 0)
    prefix = allowed.new_ones(*allowed.shape[:2], num_persistent)
    return torch.cat([prefix, allowed], dim=-1)[:, None]


# flex attention's block size. Inductor's CPU flex kernel (torch 2.13) gave NaN or wrong outputs on an AVX2 CPU when
# the keys were not whole blocks (pure-torch repro: 4 queries over 8 or 24 keys, compiled against uncompiled flex;
# cf. pytorch/pytorch#159247), though the same tests had passed on an AVX-512 CPU: it evidently reads keys past the
# end of a partial block. On the CPU, queries and keys are therefore padded with zeros to whole blocks; the padding is
# never visible (`titans_mask_function`) and the padded rows' outputs are dropped.
_FLEX_BLOCK = 128


def titans_mask_function(q_pos, kv_pos, num_cached, num_persistent, window=None, segment=None, context=False,
                         lookback=None, block=_FLEX_BLOCK):
    """`titans_attention_mask` as a mask function (b, h, q, kv) -> bool, for flex attention's BlockMask.

    It reads small per-row and per-column tensors instead of a dense (B, Lq, Lk) mask, so memory stays O(B·L). A
    dense mask at 4 × 32k tokens is 4.3 GB with more than 2^31 entries; flex with it crashed there on an H200
    (illegal memory access; an index overflow is the likely cause, not yet confirmed). Key axis: [persistent |
    keys], or, with `context` (MAC), [persistent | retrieved tokens | keys], where the retrieved tokens have the
    keys' positions; `lookback` limits only those, and a padding query sees none of them. Everything the function
    reads is a tensor, with lengths padded to a multiple of flex's block size (flex evaluates whole blocks; padded
    columns are of no kind, so never visible): Python ints in the closure would become symbolic on a second length,
    which inductor's CPU flex template fails to compile (torch 2.13).
    """
    bsz, n_kv, device = kv_pos.shape[0], kv_pos.shape[1], kv_pos.device

    def padded(t, value):
        return F.pad(t, (0, -t.shape[-1] % block), value=value)

    parts = [(kv_pos.new_full((bsz, num_persistent), -1), 0)] + ([(kv_pos, 1)] if context else []) + [(kv_pos, 2)]
    column_pos = padded(torch.cat([p for p, _ in parts], dim=1), -1)
    kind = padded(torch.cat([torch.full((p.shape[1],), k, device=device) for p, k in parts]), -1)  # -1: padding
    keys_start = num_persistent + (n_kv if context else 0)
    owner = torch.arange(kind.shape[0], device=device) - keys_start - num_cached  # the query whose own slot it is
    row_pos = padded(q_pos, -1)
    never = torch.iinfo(torch.long).max // 4
    limits = torch.tensor([window or never, segment or never, lookback or never], device=device)

    def mask_function(b, h, q, kv):
        qp, kp, k = row_pos[b, q], column_pos[b, kv], kind[kv]
        allowed = (kp >= 0) & (kp <= qp) & (qp - kp < limits[0])
        segment_of = lambda p: torch.div(p, limits[1], rounding_mode="floor")  # noqa: E731
        allowed = allowed & (segment_of(kp) == segment_of(qp))
        keys = (k == 2) & (allowed | ((owner[kv] == q) & (qp < 0)))  # a padding query sees its own slot
        retrieved = (k == 1) & allowed & (qp >= 0) & (qp - kp < limits[2])
        return (k == 0) | keys | retrieved

    return mask_function


def titans_block_mask(q_pos, kv_pos, num_cached, num_persistent, window=None, segment=None, context=False,
                      lookback=None, block=_FLEX_BLOCK, whole_blocks=False):
    """flex attention's BlockMask for `titans_mask_function`, from the position range of each block.

    `create_block_mask` (what masking_utils calls) evaluates the mask function on every (query, key) pair to find
    the blocks it needs: O(B·Lq·Lk), 4.3e9 evaluations per layer and forward at 4 × 32k tokens. On an H200 the
    memory-disabled model's forward took 235 ms at 4 × 32k against a 57 ms backward, and its time per token grew
    with the length. Here a block pair is kept when its position ranges allow a visible pair, in O(B·(Lq/block)·
    (Lk/block)). The kept set is a superset of the blocks with a visible pair (tight for training positions), and
    the mask function decides each pair inside the kept blocks, so the attention is the same.
    `whole_blocks`: for queries and keys padded to whole blocks (`_FLEX_BLOCK`); the padding is never visible.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bsz, q_len, n_kv, device = q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1], q_pos.device
    keys_start = num_persistent + (n_kv if context else 0)
    kv_len = keys_start + n_kv
    n_q, n_k = -(-q_len // block), -(-kv_len // block)
    never = torch.iinfo(torch.long).max // 4

    def ranges(pos, start, n_blocks):  # per block: min and max of the valid (>= 0) positions placed at `start`
        placed = F.pad(pos, (start, n_blocks * block - start - pos.shape[1]), value=-1).view(bsz, n_blocks, block)
        valid = placed >= 0
        return torch.where(valid, placed, never).amin(-1), placed.amax(-1), valid.any(-1)

    def reachable(q, k, reach):  # some valid pair with 0 <= qp - kp < reach, in the same segment
        (q_lo, q_hi, q_any), (k_lo, k_hi, k_any) = (t[:, :, None] for t in q), (t[:, None, :] for t in k)
        keep = q_any & k_any & (q_hi >= k_lo) & (q_lo - k_hi < reach)
        if segment is not None:  # segments of the two ranges overlap
            seg = lambda p: torch.div(p, segment, rounding_mode="floor")  # noqa: E731
            keep &= (seg(q_lo) <= seg(k_hi)) & (seg(k_lo) <= seg(q_hi))
        return keep

    q_ranges = ranges(q_pos, 0, n_q)
    keep = reachable(q_ranges, ranges(kv_pos, keys_start, n_k), window or never)
    if context:  # MAC's retrieved tokens: also limited by the lookback, and never seen by a padding query
        keep |= reachable(q_ranges, ranges(kv_pos, num_persistent, n_k), min(window or never, lookback or never))
    column_block = torch.arange(n_k, device=device)
    if num_persistent:  # visible to every query
        keep |= (column_block < -(-num_persistent // block))[None, None, :]
    # a padding query sees its own slot: query i's is column keys_start + num_cached + i
    padding = F.pad(q_pos < 0, (0, n_q * block - q_len), value=False).view(bsz, n_q, block).any(-1)
    first = keys_start + num_cached + torch.arange(n_q, device=device) * block
    own = (column_block >= (first // block)[:, None]) & (column_block <= ((first + block - 1) // block)[:, None])
    keep |= padding[:, :, None] & own[None]
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True).to(torch.int32)  # kept blocks first
    visible = titans_mask_function(q_pos, kv_pos, num_cached, num_persistent, window=window, segment=segment,
                                   context=context, lookback=lookback, block=block)
    # wrapped as masking_utils wraps every mask function (offsets 0): passed bare, inductor's CPU flex template
    # failed to compile (undeclared variable) when a second length recompiled flex (torch 2.13)
    lengths = (n_q * block, n_k * block) if whole_blocks else (q_len, kv_len)
    return BlockMask.from_kv_blocks(counts[:, None], order[:, None], BLOCK_SIZE=block, seq_lengths=lengths,
                                    mask_mod=add_offsets_to_mask_function(visible, 0, 0))


class TitansAttention(nn.Module):
    """Multi-head attention with N_p persistent tokens (Eq. 19) prepended to the keys.

    `segment=False`: sliding window of `attention_window` tokens (SW-Attn of MAG/MAL, Eq. 27/31).
    `segment=True`: MAC attention (Eq. 22-23) inside segments of `attention_window` tokens over
    [persistent | retrieved memory h | segment tokens], both h and tokens causal.
    """

    def __init__(self, config: TitansConfig, layer_idx: int, segment: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.segment = segment
        self.window = config.attention_window
        # MAC's reach over [persistent | h | x] (model card D20): causal inside the segment (the paper's Eq. 21-23),
        # or, with mac_attention="sliding", a sliding window across segment starts
        self.segment_local = segment and config.mac_attention == "segment"
        self.mac_reach = {"segment": self.window} if self.segment_local else {"window": self.window}
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.persistent_tokens = (
            nn.Parameter(torch.zeros(config.num_persistent_tokens, config.hidden_size))
            if config.num_persistent_tokens
            else None
        )

    def _kv(self, x, cos, sin):
        shape = (*x.shape[:2], -1, self.head_dim)
        k = apply_rotary_pos_emb(self.k_proj(x).view(shape).transpose(1, 2), cos, sin)
        return k, self.v_proj(x).view(shape).transpose(1, 2)

    def _persistent_kv(self, dtype: torch.dtype, layer_cache: "TitansLayerCache | None"):
        """K/V of the persistent tokens, (1, H, N_p, d) each. They depend on the weights only, so in inference the
        cache keeps them like the K/V of a prefix: two projections fewer per decoding step. Recomputed where the cache
        has none (new cache, snapshot, `reset`) or holds another dtype or device; never kept under autograd or
        tracing."""
        keep = layer_cache is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        kept = layer_cache.persistent_kv if keep else None
        if kept is not None and kept[0].dtype == dtype and kept[0].device == self.persistent_tokens.device:
            return kept
        p = self.persistent_tokens.to(dtype)
        kv = tuple(
            proj(p).view(p.shape[0], -1, self.head_dim).transpose(0, 1)[None] for proj in (self.k_proj, self.v_proj)
        )
        if keep:
            layer_cache.persistent_kv = kv
        return kv

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        layer_cache: "TitansLayerCache | None" = None,
        context: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.shape
        cos, sin = position_embeddings
        query = apply_rotary_pos_emb(
            self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2), cos, sin
        )
        key, value = self._kv(hidden_states, cos, sin)
        kv_pos = positions
        num_cached = 0
        # MAC: a slice that is one whole segment in every row sees no cached key (they all lie in earlier segments),
        # so it skips them: half the keys of a training segment, and the same cache afterwards
        whole_segment = (
            self.segment_local
            and q_len == self.window
            and _holds_everywhere((positions[:, 0] >= 0) & (positions[:, 0] % self.window == 0))
        )
        if layer_cache is not None and layer_cache.keys is not None:
            if layer_cache.keys.dtype != key.dtype:  # (joined, the two would be promoted to one dtype and fail in the
                # attention kernel, or silently change the cache's dtype)
                raise ValueError(
                    f"This TitansCache holds attention keys in {layer_cache.keys.dtype}, but layer {self.layer_idx} "
                    f"now computes them in {key.dtype}: the model's dtype (or autocast) changed since the cache was "
                    "filled. Continue the cache in the dtype that filled it, or start a new TitansCache."
                )
            if not whole_segment:
                num_cached = layer_cache.keys.shape[2]
                key = torch.cat([layer_cache.keys, key], dim=2)
                value = torch.cat([layer_cache.values, value], dim=2)
                kv_pos = torch.cat([layer_cache.positions, positions], dim=1)

        keep = self.window - 1  # a query sees itself and at most window-1 earlier tokens
        n_p = 0 if self.persistent_tokens is None else self.persistent_tokens.shape[0]
        flex = self.config._attn_implementation == "flex_attention"
        whole_blocks = flex and query.device.type == "cpu"  # see _FLEX_BLOCK
        blocked = False  # True: the attention returns rows past q_len, to drop
        if self.segment:  # MAC's retrieved tokens, aligned with the keys (the same positions)
            ctx_key, ctx_value = self._kv(context, cos, sin)
            if layer_cache is not None and layer_cache.context_keys is not None and not whole_segment:
                ctx_key = torch.cat([layer_cache.context_keys, ctx_key], dim=2)
                ctx_value = torch.cat([layer_cache.context_values, ctx_value], dim=2)
        # one-token decoding: the cache holds only the window-1 previous real tokens, so the visible keys are known
        # without a mask (a traced graph takes the general mask: no data-dependent branch)
        one_token = (
            q_len == 1
            and self.config._attn_implementation in ("sdpa", "eager")
            and _holds_everywhere(kv_pos >= 0)
        )
        seen = None  # MAC, every row at the same phase: the segment's keys so far, the same number in every row
        if self.segment_local and one_token:
            phase = positions[:, 0] % self.window
            seen = int(phase[0]) + 1 if _holds_everywhere(phase == phase[0]) else None
        if seen is not None:  # MAC: the segment's keys so far, and its retrieved tokens within the lookback
            lookback = min(seen, self.config.num_memory_tokens or seen)
            mask = None
            all_key = torch.cat([ctx_key[:, :, -lookback:], key[:, :, -seen:]], dim=2)
            all_value = torch.cat([ctx_value[:, :, -lookback:], value[:, :, -seen:]], dim=2)
        elif self.segment:
            lookback = self.config.num_memory_tokens
            if flex:
                mask = titans_block_mask(
                    positions, kv_pos, num_cached, n_p, context=True, lookback=lookback, **self.mac_reach,
                    whole_blocks=whole_blocks,
                )  # fmt: skip
            else:
                mask = titans_attention_mask(positions, kv_pos, num_cached, 0, **self.mac_reach)
                ctx_mask = titans_attention_mask(positions, kv_pos, num_cached, 0, lookback=lookback, **self.mac_reach)
                ctx_mask &= (positions >= 0)[:, None, :, None]
                mask = torch.cat([mask.new_ones(bsz, 1, q_len, n_p), ctx_mask, mask], dim=-1)
            all_key, all_value = torch.cat([ctx_key, key], dim=2), torch.cat([ctx_value, value], dim=2)
        elif q_len > 2 * self.window and not flex:  # flex: a block mask skips the blocks outside the window
            query, all_key, all_value, mask = self._window_blocks(query, key, value, positions, kv_pos, num_cached, n_p)
            blocked = True
        elif one_token:  # every cached key is visible
            mask, all_key, all_value = None, key, value
        elif flex:  # its BlockMask, from the positions (no dense mask)
            mask = titans_block_mask(positions, kv_pos, num_cached, n_p, window=self.window, whole_blocks=whole_blocks)
            all_key, all_value = key, value
        else:
            mask = titans_attention_mask(positions, kv_pos, num_cached, n_p, window=self.window)
            all_key, all_value = key, value

        if layer_cache is not None:
            start = max(key.shape[2] - keep, 0)
            layer_cache.keys, layer_cache.values = key[:, :, start:], value[:, :, start:]
            layer_cache.positions = kv_pos[:, start:]
            if self.segment:
                layer_cache.context_keys, layer_cache.context_values = ctx_key[:, :, start:], ctx_value[:, :, start:]

        if self.persistent_tokens is not None:  # position-free: no RoPE on persistent keys (model card D8)
            rows = all_key.shape[0]
            p_key, p_value = (t.expand(rows, -1, -1, -1) for t in self._persistent_kv(query.dtype, layer_cache))
            all_key = torch.cat([p_key, all_key], dim=2)
            all_value = torch.cat([p_value, all_value], dim=2)

        if whole_blocks:
            whole = lambda t: F.pad(t, (0, 0, 0, -t.shape[2] % _FLEX_BLOCK))  # noqa: E731
            query, all_key, all_value, blocked = whole(query), whole(all_key), whole(all_value), True
        impl = self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        if impl.startswith("flash"):
            raise ValueError(
                f"attn_implementation={impl!r} cannot express Titans' persistent-prefix + window/segment mask; "
                "use 'sdpa', 'flex_attention' or 'eager'."
            )
        # the backend's own mask format (bool for sdpa, additive for eager) from masking_utils, with the
        # position-based pattern above as the mask function; flex's BlockMask is built above (`titans_block_mask`)
        if flex:
            mask_kwargs = None
        elif mask is not None and not (q_len == 1 and impl in ("sdpa", "eager")):  # one query: the bool mask as is
            dense = mask[:, 0]
            mask_kwargs = dict(
                batch_size=dense.shape[0], q_length=dense.shape[1], kv_length=dense.shape[2],
                mask_function=lambda b, h, q, kv: dense[b, q, kv], device=query.device,
            )  # fmt: skip
        else:
            mask_kwargs = None
        if mask_kwargs is not None:
            if impl == "sdpa":
                mask_kwargs["allow_is_causal_skip"] = False  # never let SDPA fall back to is_causal (it crops K/V)
            elif impl == "eager":
                mask_kwargs["dtype"] = query.dtype
            if impl in ALL_MASK_ATTENTION_FUNCTIONS:
                mask = ALL_MASK_ATTENTION_FUNCTIONS[impl](**mask_kwargs)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            all_key.contiguous(),
            all_value.contiguous(),
            mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(bsz, -1, attn_output.shape[-2] * attn_output.shape[-1])
        if blocked:
            attn_output = attn_output[:, :q_len]
        return self.o_proj(attn_output.contiguous()), attn_weights

    def _window_blocks(self, query, key, value, q_pos, kv_pos, num_cached, num_persistent):
        """Sliding window in blocks of `window` queries, each block seeing its own and the previous block of keys:
        O(T·W) time and memory instead of a dense T×T mask. Returns block-batched (B·nb, ...) query, keys, mask."""
        w = self.window
        bsz, heads, q_len, dim = query.shape
        nb = -(-q_len // w)
        pad = nb * w - q_len
        lead = w - num_cached  # new token j sits at w + j of the extended key axis (num_cached <= w - 1)
        index = (torch.arange(nb, device=query.device)[:, None] * w + torch.arange(2 * w, device=query.device)).flatten()

        def blocks(t):  # (B, H, S + L, d) -> (B·nb, H, 2w, d)
            t = F.pad(t, (0, 0, lead, pad))[:, :, index].view(bsz, t.shape[1], nb, 2 * w, dim)
            return t.transpose(1, 2).reshape(bsz * nb, t.shape[1], 2 * w, dim)

        kv_pos_b = F.pad(kv_pos, (lead, pad), value=-1)[:, index].view(bsz * nb, 2 * w)
        q_pos_b = F.pad(q_pos, (0, pad), value=-1).view(bsz * nb, w)
        query_b = F.pad(query, (0, 0, 0, pad)).view(bsz, heads, nb, w, dim).transpose(1, 2).reshape(bsz * nb, heads, w, dim)
        mask = titans_attention_mask(q_pos_b, kv_pos_b, w, num_persistent, window=w)
        return query_b, blocks(key), blocks(value), mask


# ----------------------------------------------------------------------------------------------------------------
# Cache: one small record per decoder layer, beside the model that writes it
# ----------------------------------------------------------------------------------------------------------------


class TitansLayerCache(CacheLayerMixin):
    """State of one decoder layer: attention K/V that can still be attended (window-1 tokens, or the open MAC
    segment, with their absolute positions), MAC's retrieved-memory K/V and segment-start memory, and the neural
    memory's `TitansMemoryState`. Its size never grows with the number of tokens seen."""

    is_compileable = False
    is_croppable = False
    is_sliding = True

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.context_keys = self.context_values = None
        self.persistent_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # derived from the weights: not saved
        self.memory: TitansMemoryState | None = None
        self.segment_weights: tuple[torch.Tensor, ...] | None = None
        self.cumulative_length = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("TitansLayerCache is written by the Titans layers themselves, not by `update`.")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length + (0 if self.keys is None else self.keys.shape[2]), 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n) for n in ("keys", "values", "positions", "context_keys", "context_values")}
        out = {n: t for n, t in out.items() if t is not None}
        if self.segment_weights is not None:
            out.update({f"segment_weights.{i}": t for i, t in enumerate(self.segment_weights)})
        if self.memory is not None:
            out.update({f"memory.{n}": t for n, t in self.memory.tensors().items()})
        return out

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("keys", "values", "positions", "context_keys", "context_values"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if self.segment_weights is not None:
            self.segment_weights = tuple(fn(t) for t in self.segment_weights)
        if self.memory is not None:
            self.memory.apply(fn)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `tensors()`."""
        for name in ("keys", "values", "positions", "context_keys", "context_values"):
            setattr(self, name, tensors.get(name))
        seg = sorted((int(n.split(".")[1]), t) for n, t in tensors.items() if n.startswith("segment_weights."))
        self.segment_weights = tuple(t for _, t in seg) or None
        memory = {n[len("memory.") :]: t for n, t in tensors.items() if n.startswith("memory.")}
        if memory:
            stacked = lambda field: tuple(  # noqa: E731
                t for _, t in sorted((int(n.split(".")[1]), t) for n, t in memory.items() if n.startswith(field + "."))
            )
            self.memory = TitansMemoryState(
                weights=stacked("weights"),
                momentum=stacked("momentum"),
                buffer_k=memory["buffer_k"],
                buffer_v=memory["buffer_v"],
                buffer_gates=memory["buffer_gates"],
                buffer_length=memory["buffer_length"],
                conv=memory.get("conv"),
                current_weights=stacked("current_weights"),
                current_momentum=stacked("current_momentum"),
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.apply(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("A Titans memory cannot be rolled back: its weights were updated by every token.")

    def offload(self):
        self.apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        pass


class TitansCache(Cache):
    """Recurrent cache of a `TitansForCausalLM` (one `TitansLayerCache` per decoder layer).

    `get_seq_length()` is the number of positions seen (padding included), which `generate()` uses to slice new
    inputs; `real_tokens` (B,) counts real tokens per row and gives absolute positions. Bounded: O(window + memory
    size) per layer whatever the stream length. Not croppable, so assisted decoding is refused (`_is_stateful`).
    """

    def __init__(self, config: TitansConfig, **kwargs):
        super().__init__(layers=[TitansLayerCache() for _ in range(config.num_hidden_layers)])
        self.signature = cache_signature(config)
        self.real_tokens: torch.Tensor | None = None
        self.checked_config = None  # weak reference to the config last found to match (a step skips re-checking)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return -1 if self.real_tokens is None else self.real_tokens.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if self.layers else 0

    def _apply(self, fn):
        for layer in self.layers:
            layer.apply(fn)
        if self.real_tokens is not None:
            self.real_tokens = fn(self.real_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._apply(lambda t: t[indices])

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self.real_tokens = None

    def crop(self, max_length: int):
        raise NotImplementedError("A Titans memory cannot be rolled back: its weights were updated by every token.")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"layers.{i}.{n}": t for i, layer in enumerate(self.layers) for n, t in layer.tensors().items()}
        if self.real_tokens is not None:
            out["real_tokens"] = self.real_tokens
        return out

    def nbytes(self) -> int:
        """Total bytes of every tensor the cache holds."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def save_snapshot(self, path: str) -> None:
        """Write the whole memory state (a "memory snapshot") to a safetensors file."""
        from safetensors.torch import save_file

        metadata = {
            "format": SNAPSHOT_FORMAT,
            "signature": json.dumps(self.signature),
            "cumulative_length": json.dumps([layer.cumulative_length for layer in self.layers]),
        }
        save_file({n: t.detach().clone(memory_format=torch.contiguous_format) for n, t in self.tensors().items()}, path, metadata=metadata)

    @classmethod
    def from_snapshot(cls, path: str, config: TitansConfig, device: str | torch.device = "cpu") -> "TitansCache":
        """Load a memory snapshot written by `save_snapshot`; it must come from a model with the same config."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if metadata.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a Titans memory snapshot (format {metadata.get('format')!r}).")
        cache = cls(config)
        saved = json.loads(metadata["signature"])
        mismatch = {k: (saved.get(k), v) for k, v in cache.signature.items() if saved.get(k) != v}
        if mismatch:
            raise ValueError(f"Memory snapshot {path} was made by another model; mismatched (snapshot, model): {mismatch}")
        for layer, length in zip(cache.layers, json.loads(metadata["cumulative_length"])):
            layer.cumulative_length = length
            layer.is_initialized = length > 0
        for i, layer in enumerate(cache.layers):
            layer.load_tensors({n[len(f"layers.{i}.") :]: t for n, t in tensors.items() if n.startswith(f"layers.{i}.")})
        cache.real_tokens = tensors.get("real_tokens")
        return cache


SNAPSHOT_FORMAT = "titans-memory-snapshot-v1"


def cache_signature(config: TitansConfig) -> dict:
    """What a cache must agree on with the model that continues it."""
    keys = (
        "variant", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "attention_window", "num_memory_heads", "memory_head_dim", "memory_depth", "memory_expansion",
        "memory_chunk_size", "memory_conv_size", "memory_layers",
    )  # fmt: skip
    return {k: getattr(config, k) for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# Decoder layer: the only variant-specific part is how attention and memory are wired (paper §4)
# ----------------------------------------------------------------------------------------------------------------


class TitansDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        has_memory = layer_idx in config.memory_layers
        # layers without memory are sliding-window attention layers ("swa") in every variant
        self.mode = config.variant if has_memory else "swa"
        self.input_layernorm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.mode != "lmm":
            self.self_attn = TitansAttention(config, layer_idx, segment=self.mode == "mac")
        if has_memory:
            self.memory = TitansNeuralMemory(config, layer_idx)
        if self.mode == "mal":
            self.memory_layernorm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.mode in ("mag", "mac"):
            # ⊗ of Eq. 25/28: normalise both branches with learnable weights, then a sigmoid gate
            self.attention_gate_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.memory_gate_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = TitansMLP(config)

    def _gate(self, y: torch.Tensor, memory_out: torch.Tensor) -> torch.Tensor:
        a, m = self.attention_gate_norm, self.memory_gate_norm
        gate = _maybe_compiled(memory_gate, y.shape[1])
        return gate(y, memory_out, a.weight, a.variance_epsilon, m.weight, m.variance_epsilon)

    def _attention(self, x, position_embeddings, positions, layer_cache, **kwargs):
        """Sliding-window attention. Long inputs without a cache go by time pieces (`_PIECE_ELEMENTS`), each seeing
        the last window-1 keys of the piece before through a scratch cache, exactly as a continued cache does."""
        size = _piece_length(x[:, :1].numel(), x.device, self.config.attention_window)
        if layer_cache is not None or x.shape[1] <= size or self.config._attn_implementation == "flex_attention":
            return self.self_attn(x, position_embeddings, positions, layer_cache, **kwargs)[0]
        scratch = TitansLayerCache()
        pieces = zip(*(t.split(size, dim=1) for t in (x, *position_embeddings, positions)))
        return torch.cat([self.self_attn(p, (cos, sin), pos, scratch, **kwargs)[0] for p, cos, sin, pos in pieces], 1)

    def _memory(self, x, valid, layer_cache):
        if layer_cache is None:
            return self.memory(x, valid)[0]
        out, layer_cache.memory = self.memory(x, valid, layer_cache.memory, return_state=True)
        return out

    def _memory_as_context(self, x, position_embeddings, positions, valid, layer_cache):
        """MAC (Eq. 21-25), segment by segment: retrieve h with the memory before the segment, attend over
        [persistent | h | segment], write the attention output y into the memory, gate y with M_t(y_t).

        Rows may be at different phases of their segments (left padding, continued caches): the input is cut
        wherever any row closes a segment, so that no slice crosses a segment boundary of any row.
        """
        segment = self.config.attention_window
        scratch = layer_cache if layer_cache is not None else TitansLayerCache()
        real = positions >= 0
        state = scratch.memory or self.memory.initial_state(x.shape[0], x.device, x.dtype)
        segment_weights = scratch.segment_weights or state.weights
        closes = real & (positions % segment == segment - 1)
        # no padding and no cache: positions 0..T-1 in every row, so the cuts are known without a host read (one graph
        # under torch.compile), and every slice starts a segment: segment-local attention (the default) sees no earlier
        # key there and needs no cache (`mac_attention="sliding"` sees the window-1 keys before, from the scratch cache)
        aligned = valid is None and layer_cache is None
        if x.shape[1] == 1:  # one token (decoding): one slice, no host sync
            cuts = [1]
        elif aligned:
            cuts = [*range(segment, x.shape[1], segment), x.shape[1]]
        else:
            cuts = sorted({int(i) + 1 for i in closes.any(0).nonzero().flatten().tolist()} | {x.shape[1]})
        # one split per input rather than a slice per segment: each slice's backward adds a zero-filled gradient of
        # the whole input, which made the backward quadratic in the number of segments
        sizes = [end - start for start, end in zip([0, *cuts[:-1]], cuts)]
        split = lambda t: t.split(sizes, dim=1)  # noqa: E731
        attention_cache = None if aligned and self.self_attn.segment_local else scratch
        valids = split(valid) if valid is not None else [None] * len(sizes)
        # the read-out's query and gate projections depend on x alone: one product each for all segments, not two
        # small ones per segment (and two more in the backward's recompute)
        queries, gates = split(self.memory.q_proj(x)), split(self.memory.g_proj(x))
        pieces = zip(
            split(x), *map(split, position_embeddings), split(positions), split(closes), valids, queries, gates
        )
        outputs = []
        trim = _heap_trimmer(x)
        for i, (xs, cos, sin, pos, close, valid_s, q, g) in enumerate(pieces):
            if torch.is_grad_enabled():  # the read-out is cheap to redo in the backward and large to keep per segment
                context = checkpoint(self.memory.read, q, g, segment_weights, use_reentrant=False)
            else:
                context = self.memory.read(q, g, segment_weights)
            y, _ = self.self_attn(xs, (cos, sin), pos, attention_cache, context=context)
            memory_out, state = self.memory(y, valid_s, state, return_state=True)
            outputs.append(self._gate(y, memory_out))
            segment_weights = _select(close.any(1), True, state.weights, segment_weights)
            if trim is not None and i % _TRIM_SEGMENTS == _TRIM_SEGMENTS - 1 and i < len(sizes) - 1:
                trim(0)  # (after the last segment, the layer's own trim in `forward` follows)
        if layer_cache is not None:
            layer_cache.memory, layer_cache.segment_weights = state, segment_weights
        return torch.cat(outputs, dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        past_key_values: "TitansCache | None" = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        layer_cache = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        valid = None if padding is None else ~padding
        residual = hidden_states
        if self.mode == "mal":  # memory as a layer, then sliding-window attention (Eq. 29-31)
            hidden_states = residual = residual + self._memory(
                _position_wise(self.memory_layernorm, hidden_states), valid, layer_cache
            )
        x = _position_wise(self.input_layernorm, hidden_states)
        if self.mode in ("swa", "mal"):
            out = self._attention(x, position_embeddings, positions, layer_cache, **kwargs)
        elif self.mode == "lmm":  # memory only (§4.3, "memory without attention")
            out = self._memory(x, valid, layer_cache)
        elif self.mode == "mag":  # memory as a gate (Eq. 26-28): SW-Attn branch ⊗ memory branch
            y = self._attention(x, position_embeddings, positions, layer_cache, **kwargs)
            out = _position_wise(self._gate, y, self._memory(x, valid, layer_cache))
        else:  # mac
            out = self._memory_as_context(x, position_embeddings, positions, valid, layer_cache)
        hidden_states = residual + out
        hidden_states = _position_wise(lambda h: h + self.mlp(self.post_attention_layernorm(h)), hidden_states)
        trim = _heap_trimmer(hidden_states)
        if trim is not None:  # long training input on CPU: hand the heap's free pages back after each layer
            trim(0)
        return hidden_states


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class TitansPreTrainedModel(PreTrainedModel):
    config_class = TitansConfig
    config: TitansConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TitansDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = False  # window/segment + persistent prefix is not one FlashAttention call (model card)
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    _supports_attention_backend = False
    _is_stateful = True  # generate() refuses assisted decoding, which would need to roll the memory back

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # never let generate() build a DynamicCache from this config

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Transformers writes only the saved class into config.json's auto_map; with both entries, a saved Titans
        # loads through AutoModel (the base model) and AutoModelForCausalLM alike, as an in-library model does
        module = TitansModel.__module__.rsplit(".", 1)[-1]  # "modeling_titans", also when loaded as remote code
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for auto_class, cls in (("AutoModel", TitansModel), ("AutoModelForCausalLM", TitansForCausalLM)):
            auto_map.setdefault(auto_class, f"{module}.{cls.__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, TitansNeuralMemory):
            # θ starts at max_lr/2, α ≈ 0.007 (keep almost everything), η ≈ 0.12 (little momentum): the model
            # learns how much to forget and to carry surprise.
            init.copy_(module.gate_bias, torch.tensor([[0.0], [-5.0], [-2.0]]).expand_as(module.gate_bias))
            if module.conv_weight is not None:  # identity kernel: the block starts as plain projections
                kernel = torch.zeros_like(module.conv_weight)
                kernel[:, -1] = 1.0
                init.copy_(module.conv_weight, kernel)
            for weight in module.memory_weights:
                init.normal_(weight, mean=0.0, std=weight.shape[-1] ** -0.5)
        elif isinstance(module, TitansAttention) and module.persistent_tokens is not None:
            init.normal_(module.persistent_tokens, mean=0.0, std=1.0)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)


class TitansModel(TitansPreTrainedModel):
    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TitansDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = TitansRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def _check_cache(self, cache, batch_size: int):
        if cache is None or isinstance(cache, TitansCache):
            if cache is not None:
                if cache.checked_config is None or cache.checked_config() is not self.config:
                    expected = cache_signature(self.config)
                    if cache.signature != expected:
                        diff = {k: (v, expected.get(k)) for k, v in cache.signature.items() if expected.get(k) != v}
                        raise ValueError(
                            f"This TitansCache was built for another config; mismatched (cache, model): {diff}"
                        )
                    cache.checked_config = weakref.ref(self.config)
                if cache.real_tokens is not None and cache.real_tokens.shape[0] != batch_size:
                    raise ValueError(
                        f"The TitansCache holds {cache.real_tokens.shape[0]} sequences but the input has batch size "
                        f"{batch_size}; select or repeat the cache rows first (batch_select_indices / "
                        "batch_repeat_interleave)."
                    )
            return cache
        if isinstance(cache, Cache) and cache.get_seq_length() == 0:
            return TitansCache(self.config)  # an empty foreign cache carries nothing: replace it
        raise TypeError(
            f"TitansModel needs a TitansCache (or None), got a non-empty {type(cache).__name__}. Pass "
            "`past_key_values=TitansCache(model.config)` or let generate() create one."
        )

    def _steady_decoding(self, cache, seq_len: int) -> bool:
        """One new real token per row, every attention cache full (window-1 keys) and every memory state prefilled:
        each step then has the same shapes, and under TITANS_MEMORY_KERNEL=compile one graph runs all layers
        (`_decoding_step`). Makes the cache ready for it: the open chunk's M_t, S_t, and one memory layout."""
        if seq_len != 1 or cache is None or torch.is_grad_enabled() or not _use_compiled_memory():
            return False
        if self.config._attn_implementation not in ("sdpa", "eager"):  # flex would build a BlockMask per step
            return False
        full = self.config.attention_window - 1
        for decoder_layer, layer_cache in zip(self.layers, cache.layers):
            if decoder_layer.mode != "lmm" and (layer_cache.keys is None or layer_cache.keys.shape[2] != full):
                return False
            if hasattr(decoder_layer, "memory"):
                state = layer_cache.memory
                if state is None:
                    return False
                if state.current_weights is None:  # M_t, S_t of the open chunk, once, outside the graph
                    state.current_weights, state.current_momentum = decoder_layer.memory._current(state)
        seen = set()

        def canonical(t):  # graphs are specialised on strides (prefill leaves slices of its length), on aliasing
            t = _contiguous(t)  # (MAC's segment-start weights are the memory's own after a prefill) and on
            t = t.detach() if t.requires_grad else t  # requires_grad (before a chunk closes, M_0 views the parameters)
            t = t.clone() if id(t) in seen else t
            seen.add(id(t))
            return t

        for layer_cache in cache.layers:
            layer_cache.apply(canonical)
        return True

    def _decoding_step(self, hidden_states, position_embeddings, positions, cache, **kwargs):
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states, position_embeddings=position_embeddings, positions=positions, past_key_values=cache,
                **kwargs,
            )  # fmt: skip
        for layer_cache in cache.layers:  # the next step's inputs in the same layout, written as such by the graph
            layer_cache.apply(_contiguous)
        return self.norm(hidden_states)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
            vocab = self.config.vocab_size
            if torch.compiler.is_compiling():  # a host read would cut the compiled graph in two: the same check as an
                # assertion inside the graph (on CUDA a device-side assert, which stops the process, as Llama's would)
                in_range = ((input_ids >= 0) & (input_ids < vocab)).all()
                torch._assert_async(in_range, f"input_ids contains a token id outside the vocabulary [0, {vocab}).")
            elif input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
                bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
                raise ValueError(
                    f"input_ids contains token id {int(bad[0])}, outside the vocabulary [0, {vocab})."
                )
            inputs_embeds = self.embed_tokens(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must be (batch, length, hidden_size={self.config.hidden_size}), got "
                    f"{tuple(inputs_embeds.shape)}."
                )
            if not inputs_embeds.dtype.is_floating_point:
                raise ValueError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}.")
            # the dtype the embedding would have given (a float64 input would otherwise fail deep in a matmul)
            inputs_embeds = inputs_embeds.to(self.embed_tokens.weight.dtype)
        if use_cache is None:  # training makes no cache unless asked (`use_cache=True`): with one, every memory layer
            # returns its state, which costs extra work and host reads per step (16 per MAG step at the anchor size,
            # `scripts/count_ops.py`) for a cache that Trainer throws away
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the memory state is recomputed inside each checkpointed layer
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
            # the weights have no common (query, key) layout here: MAG/MAL attend in window blocks, MAC per segment
            # over [persistent | retrieved memory | segment], LMM not at all (model card, Limitations)
            raise ValueError(
                "Titans does not return attention weights (output_attentions=True): its attention runs in window "
                "blocks or MAC segments, with no (query, key) matrix per layer. Use output_hidden_states instead."
            )
        bsz, seq_len = inputs_embeds.shape[:2]
        if seq_len == 0:
            raise ValueError("The input has no tokens (length 0): pass at least one token per row.")
        if position_ids is not None and (  # (comparisons, not `in`: see the attention_mask check below)
            position_ids.dim() != 2
            or (position_ids.shape[0] != 1 and position_ids.shape[0] != bsz)
            or position_ids.shape[1] != seq_len
        ):
            raise ValueError(
                f"position_ids must be (batch, length) = ({bsz}, {seq_len}) or (1, {seq_len}), got "
                f"{tuple(position_ids.shape)}."
            )
        cache = self._check_cache(past_key_values, bsz)
        if use_cache and cache is None:
            cache = TitansCache(self.config)
        if not use_cache and past_key_values is None:
            cache = None
        seen = cache.get_seq_length() if cache is not None else 0

        # real-token mask of the new positions; generate() passes the mask of the whole sequence so far
        padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != bsz:
                raise ValueError(f"attention_mask must be a 2D (batch, length) padding mask, got {tuple(attention_mask.shape)}")
            # (two comparisons, not `in`: traced with dynamic shapes, torch 2.13's dynamo evaluated `size in (a, b)` as
            # False for a size equal to b, and refused a right mask)
            if attention_mask.shape[1] != seq_len and attention_mask.shape[1] != seen + seq_len:
                raise ValueError(
                    f"attention_mask has length {attention_mask.shape[1]}, expected {seq_len} (new tokens) or "
                    f"{seen + seq_len} (cached + new)."
                )
            new_mask = attention_mask[:, -seq_len:].bool()
            if not _holds_everywhere(new_mask):  # (traced, a mask is taken as padding: no host read)
                padding = ~new_mask
        valid = torch.ones(bsz, seq_len, dtype=torch.bool, device=inputs_embeds.device) if padding is None else ~padding
        before = (
            cache.real_tokens.to(inputs_embeds.device)
            if cache is not None and cache.real_tokens is not None
            else torch.zeros(bsz, dtype=torch.long, device=inputs_embeds.device)
        )
        positions = (before[:, None] + valid.long().cumsum(1) - 1).masked_fill(~valid, -1)
        if position_ids is None:
            position_ids = positions.clamp(min=0)
        elif seq_len > 1 and not torch.compiler.is_compiling():
            _refuse_packed_sequences(position_ids, valid)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden_states = () if output_hidden_states else None
        if not output_hidden_states and padding is None and self._steady_decoding(cache, seq_len):
            hidden_states = _compiled_decoding_step()(self, hidden_states, position_embeddings, positions, cache, **kwargs)
        else:
            for decoder_layer in self.layers:
                if output_hidden_states:
                    all_hidden_states += (hidden_states,)
                hidden_states = decoder_layer(
                    hidden_states,
                    position_embeddings=position_embeddings,
                    positions=positions,
                    padding=padding,
                    past_key_values=cache,
                    **kwargs,
                )
            hidden_states = _position_wise(self.norm, hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
            if not isinstance(output_hidden_states, bool):  # an index or indices: the others are None, as in Llama
                # (Transformers' own selection rules, imported here: the option is new in 5.23)
                from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

                n = len(all_hidden_states)
                keep = resolve_hidden_states_indices(self, selected_hidden_states(output_hidden_states), n)
                all_hidden_states = tuple(h if i in keep else None for i, h in enumerate(all_hidden_states))
        if cache is not None:
            cache.real_tokens = before + valid.sum(1)
            for layer in cache.layers:
                layer.cumulative_length += seq_len
                layer.is_initialized = True
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=cache, hidden_states=all_hidden_states
        )


def _refuse_packed_sequences(position_ids: torch.Tensor, valid: torch.Tensor) -> None:
    """Packed sequences (position ids restarting inside a row, as `DataCollatorWithFlattening` makes them) would let
    the memory and the window attention run on from one document into the next: refused rather than silently mixed.
    Padding is skipped, so generate()'s ids for left-padded rows (1 at the pads) pass."""
    ids = position_ids.long().expand(valid.shape).masked_fill(~valid, torch.iinfo(torch.long).min)
    before = ids.cummax(dim=1).values[:, :-1]
    if bool((valid[:, 1:] & (ids[:, 1:] <= before)).any()):
        raise ValueError(
            "position_ids restart inside a row (packed sequences, e.g. DataCollatorWithFlattening): Titans' memory and "
            "window attention would carry from one sequence into the next. Pad the sequences into a batch instead, "
            "or concatenate them as one stream without position_ids."
        )


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get("past_key_values")
        if user_cache is not None and not isinstance(user_cache, TitansCache):
            raise TypeError(
                f"Titans generation needs a TitansCache, got {type(user_cache).__name__}. Pass "
                "`past_key_values=TitansCache(model.config)` (or a cache returned by a previous generate) or none."
            )
        if user_cache is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation not in (None, "dynamic"):
            logger.warning_once(
                f"Titans uses its own TitansCache; cache_implementation={generation_config.cache_implementation!r} is ignored."
            )
        model_kwargs["past_key_values"] = TitansCache(self.config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(
                    f"labels must be (batch, length) like the logits, {tuple(logits.shape[:2])}, got {tuple(labels.shape)}."
                )
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )


TitansConfig.register_for_auto_class()
TitansModel.register_for_auto_class("AutoModel")
TitansForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["TitansCache", "TitansForCausalLM", "TitansModel", "TitansNeuralMemory", "TitansPreTrainedModel"]
