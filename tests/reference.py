"""Independent token-by-token reference of the Titans memory, written directly from the paper's equations.

No closed form, no dual form: each step takes the gradient of the associative loss (Eq. 12) with autograd at the
chunk-start weights (§3.2, Eq. 16), divides each layer's gradient by 1 + ||input of that layer||² (normalised step,
model card D19), then applies momentum (Eq. 14) and forgetting (Eq. 13), and reads the memory with the updated
weights (Eq. 15).
"""

import torch


def mlp(weights, x, act):
    a = x
    for i, w in enumerate(weights):
        a = a @ w.T
        if i < len(weights) - 1:
            a = act(a)
    return a + x if len(weights) > 1 else a


def layer_inputs(weights, x, act):
    """The input of every layer of the memory MLP for x."""
    inputs, a = [], x
    for i, w in enumerate(weights):
        inputs.append(a)
        a = a @ w.T
        if i < len(weights) - 1:
            a = act(a)
    return inputs


def reference_memory(weights, q, k, v, lr, eta, alpha, chunk_size, act=torch.nn.functional.silu, initial=None):
    """One head, one sequence. weights: list of (d_out, d_in); q, k, v: (T, d); lr, eta, alpha: (T,).

    `initial` (default: `weights`) is the learned initial memory that forgetting returns to (model card D7).
    """
    initial = [w.clone() for w in (weights if initial is None else initial)]
    M = [w.clone() for w in weights]
    S = [torch.zeros_like(w) for w in weights]
    anchor = None
    outputs = []
    for t in range(k.shape[0]):
        if t % chunk_size == 0:
            anchor = [w.detach().clone() for w in M]
        params = [w.clone().requires_grad_(True) for w in anchor]
        with torch.enable_grad():
            loss = (mlp(params, k[t], act) - v[t]).pow(2).sum()  # ℓ(M_{t'}; x_t) = ||M(k_t) - v_t||²
            grads = torch.autograd.grad(loss, params)
        grads = [g / (1 + a.pow(2).sum()) for g, a in zip(grads, layer_inputs(anchor, k[t], act))]
        S = [eta[t] * s - lr[t] * g for s, g in zip(S, grads)]  # S_t = η_t S_{t-1} - θ_t ∇ℓ
        M = [(1 - alpha[t]) * m + alpha[t] * m0 + s for m, m0, s in zip(M, initial, S)]  # Eq. 13, D7
        outputs.append(mlp(M, q[t], act))  # y_t = M*_t(q_t)
    return torch.stack(outputs), M, S
