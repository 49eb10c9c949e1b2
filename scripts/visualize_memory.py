# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Plot what the neural memory of a saved Titans does over a text, per memory layer and memory head:

- surprise: the norm of the momentary gradient u_t = ∇_M ℓ(M; k_t, v_t) of the inner loss ℓ = ||M(k_t) − v_t||²
  w.r.t. all the memory weights, taken at the weights M of the start of t's chunk — exactly the gradient the
  chunk-parallel update uses for token t (paper Eq. 16; model card D1/D2). For a memory MLP it is
  sqrt(Σ_l ||δ_l||² ||a_l||²) (each layer's gradient is the outer product δ_l a_lᵀ);
- the data-dependent gates: inner learning rate θ_t, momentum η_t and forgetting α_t (paper Eq. 13-14);
- ||M||: the Frobenius norm of the memory weights (all memory layers) at each chunk boundary, i.e. the weights
  each chunk starts from, drawn as a step over the chunk's tokens;
- retrieval: ||M_t(q_t)||, the norm of what the memory returns for token t (before the output norm and gate).

Nothing in `modeling_titans.py` changes. Hooks record each memory layer's input x and its per-token retrieval (the
input of its `_output`) during one ordinary forward pass of the model; the script then recomputes the projections
and gates with the layer's own code (`_qkv`, `_gates`) and
gets the chunk-start weights by streaming x through the layer chunk by chunk with its `TitansMemoryState`, as a
`TitansCache` does. Writes one PNG (and, with --json, the numbers).

    .venv/bin/python scripts/visualize_memory.py outputs/quickstart --output results/memory_viz.png
"""

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_TEXT_FILE = "json/encoder.py"  # a stdlib file (held out or not, it is just something to read)


def default_text() -> str:
    import sysconfig

    with open(os.path.join(sysconfig.get_paths()["stdlib"], DEFAULT_TEXT_FILE), encoding="utf-8") as f:
        return f.read()


def find_memories(model):
    """(layer index, TitansNeuralMemory) for every decoder layer that has a memory."""
    layers = model.model.layers
    return [(i, layer.memory) for i, layer in enumerate(layers) if hasattr(layer, "memory")]


class Recorder:
    """Hooks on one memory: the inputs x of its `forward` calls and the per-token retrieval M_t(q_t) (the first
    argument of its `_output`, wrapped on the instance, while inside `forward`)."""

    def __init__(self, memory):
        self.memory, self.inputs, self.retrievals, self.inside = memory, [], [], False
        output = memory._output

        def recording_output(y, x):
            if self.inside:
                self.retrievals.append(y.detach())  # (B, T, H, d)
            return output(y, x)

        memory._output = recording_output
        self.handles = [memory.register_forward_pre_hook(self.pre), memory.register_forward_hook(self.post)]

    def pre(self, module, args, kwargs=None):
        self.inside = True
        self.inputs.append(args[0].detach())

    def post(self, module, args, output):
        self.inside = False

    def remove(self):
        del self.memory._output  # back to the class's method
        for h in self.handles:
            h.remove()


def qkv(memory, x: torch.Tensor):
    """The memory's q, k, v for x (B, T, D) from the start of a stream: (B, H, T, d) each, as in its forward."""
    return memory._qkv(x, None)[:3]


def gradient_factors(weights, k: torch.Tensor, v: torch.Tensor, activation: str, activations=None):
    """Per-token gradient of ||M(k) - v||² w.r.t. each memory layer as (inputs a_l, deltas δ_l): the gradient of
    token j w.r.t. layer l is δ_l[j] ⊗ a_l[j]. Same forward and analytic backward as the model's chunk update."""
    if activations is None:
        sys.path.insert(0, ROOT)
        from modeling_titans import _MEMORY_ACTIVATIONS as activations

    act, act_grad = activations[activation][:2]
    depth = len(weights)
    inputs, pre_acts, a = [], [], k
    for layer, w in enumerate(weights):
        inputs.append(a)
        z = a @ w.transpose(-1, -2)
        pre_acts.append(z)
        a = act(z) if layer < depth - 1 else z
    prediction = a + k if depth > 1 else a
    delta = 2.0 * (prediction - v)
    deltas = [None] * depth
    for layer in reversed(range(depth)):
        deltas[layer] = delta
        if layer > 0:
            delta = (delta @ weights[layer]) * act_grad(pre_acts[layer - 1])
    return inputs, deltas


def surprise_norm(weights, k: torch.Tensor, v: torch.Tensor, activation: str, factors=None) -> torch.Tensor:
    """||∇_W ||M_W(k_t) − v_t||²||_F per token, W = `weights` (each (B, H, d_out, d_in)); k, v (B, H, n, d).
    Each layer's gradient is an outer product δ aᵀ, whose squared Frobenius norm is ||δ||² ||a||². `factors`: the
    model's own `memory_gradient_factors` when its modeling file has it (whose deltas carry the normalised step of
    model card D19: the surprise the update uses), else the copy above (the plain gradient of older models)."""
    inputs, deltas = (factors or gradient_factors)(weights, k, v, activation)
    return torch.sqrt(sum(d.pow(2).sum(-1) * a.pow(2).sum(-1) for a, d in zip(inputs, deltas)))


@torch.no_grad()
def memory_traces(memory, x: torch.Tensor, retrieval: torch.Tensor) -> dict:
    """Per head (H, T) arrays for one memory layer and one sequence x (1, T, D)."""
    module = sys.modules[type(memory).__module__]  # the model's own modeling file (remote code or local)
    factors = getattr(module, "memory_gradient_factors", None)
    if factors is None:
        factors = lambda *a: gradient_factors(*a, activations=module._MEMORY_ACTIVATIONS)  # noqa: E731
    b = memory.chunk_size
    T = x.shape[1]
    q, k, v = qkv(memory, x)
    gates = memory._gates(x)[0]  # (H, T, 3): θ, log η, log(1 − α)
    state = memory.initial_state(1, x.device, x.dtype)
    surprise, weight_norm = [], []
    for start in range(0, T, b):
        end = min(start + b, T)
        w0 = state.weights  # the weights this chunk starts from
        surprise.append(surprise_norm(w0, k[:, :, start:end], v[:, :, start:end], memory.activation, factors)[0])
        norm = torch.sqrt(sum(w.pow(2).sum((-1, -2)) for w in w0))[0]  # (H,)
        weight_norm.append(norm[:, None].expand(-1, end - start))
        _, state = memory(x[:, start:end], state=state, return_state=True)
    return {
        "surprise": torch.cat(surprise, -1),
        "theta": gates[..., 0],
        "eta": gates[..., 1].exp(),
        "alpha": 1 - gates[..., 2].exp(),
        "weight_norm": torch.cat(weight_norm, -1),
        "retrieval_norm": retrieval[0].norm(dim=-1).transpose(0, 1),  # (T, H) -> (H, T)
    }


PANELS = [
    ("surprise", "surprise ||∇_M ℓ(M_chunk start; k_t, v_t)||"),
    ("theta", "θ_t (inner learning rate)"),
    ("eta", "η_t (momentum)"),
    ("alpha", "α_t (forgetting)"),
    ("weight_norm", "||M|| at the chunk start"),
    ("retrieval_norm", "retrieval ||M_t(q_t)||"),
]


def plot(traces: dict, tokens: list[str], path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(traces)
    fig, axes = plt.subplots(len(layers), len(PANELS), figsize=(3.6 * len(PANELS), 2.5 * len(layers) + 0.8),
                             squeeze=False, sharex=True)  # fmt: skip
    T = len(tokens)
    ticks = np.linspace(0, T - 1, min(T, 6)).astype(int)
    for r, layer in enumerate(layers):
        for c, (key, name) in enumerate(PANELS):
            ax = axes[r, c]
            data = traces[layer][key]
            for h in range(data.shape[0]):
                ax.plot(np.arange(T), data[h], lw=0.8, label=f"head {h}")
            if key in ("surprise", "retrieval_norm") and np.all(data > 0) and data.max() > 10 * data.min():
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", useOffset=False)
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"layer {layer}")
            if r == len(layers) - 1:
                ax.set_xticks(ticks)
                ax.set_xlabel("token position")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path", help="saved Titans folder (trust_remote_code) or Hub id")
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--text", default=None, help="text to read (default: --text_file, else a stdlib source file)")
    p.add_argument("--text_file", default=None)
    p.add_argument("--max_tokens", type=int, default=512)
    p.add_argument("--output", default=os.path.join(ROOT, "results", "memory_viz.png"))
    p.add_argument("--json", default=None, help="also write the traces to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model_path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, trust_remote_code=True, dtype=torch.float32).eval()
    if args.text is not None:
        text, source = args.text, "--text"
    elif args.text_file:
        text, source = open(args.text_file, encoding="utf-8").read(), args.text_file
    else:
        text, source = default_text(), f"stdlib {DEFAULT_TEXT_FILE}"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, : args.max_tokens]
    if tokenizer.eos_token_id is not None:  # training documents start after <|endoftext|>
        ids = torch.cat([torch.tensor([[tokenizer.eos_token_id]]), ids[:, : args.max_tokens - 1]], dim=1)
    memories = find_memories(model)
    if not memories:
        raise SystemExit("visualize_memory.py: error: this model has no memory layer (memory_layers is empty).")
    recorders = {i: Recorder(m) for i, m in memories}
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for rec in recorders.values():
        rec.remove()
    traces = {}
    for i, memory in memories:
        rec = recorders[i]
        x = torch.cat(rec.inputs, dim=1)  # MAC calls the memory once per segment
        retrieval = torch.cat(rec.retrievals, dim=1)
        traces[i] = {k: v.float().numpy() for k, v in memory_traces(memory, x, retrieval).items()}
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    config = model.config
    title = (f"{os.path.basename(os.path.normpath(args.model_path))}: Titans {config.variant.upper()}, "
             f"{len(tokens)} tokens of {source}; memory chunk {config.memory_chunk_size}, depth {config.memory_depth}, "
             f"{config.num_memory_heads} heads\nsurprise = norm of the momentary gradient of ||M(k_t) - v_t||² w.r.t. "
             "the memory weights, at the weights of the start of t's chunk (what the update uses)")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    plot(traces, tokens, args.output, title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": tokens, "layers": {str(i): {k: v.tolist() for k, v in t.items()}
                                                   for i, t in traces.items()}}, f)  # fmt: skip
    summary = {i: {k: float(np.mean(v)) for k, v in t.items()} for i, t in traces.items()}
    print(json.dumps({"tokens": len(tokens), "mean_per_layer": summary}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
