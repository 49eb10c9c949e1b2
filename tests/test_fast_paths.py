"""Fast paths against the reference path: bf16 model vs fp32, training (stateless) vs streaming memory."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from modeling_titans import TitansCache


def check_bf16_model_tracks_fp32(variant, device="cpu"):
    """A bf16 model (weights and activations) against its fp32 self; the memory state stays fp32 (D16)."""
    model = tiny_model(variant, scale=0.1).to(device)
    ids = torch.randint(2, 64, (2, 40), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        reference = model(ids).logits
        model = model.to(torch.bfloat16)
        cache = TitansCache(model.config)
        fast = model(ids, past_key_values=cache, use_cache=True).logits
    assert fast.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: stated tolerance 5% of the logit range, argmax mostly unchanged
    assert (fast.float() - reference).abs().max() <= 0.05 * reference.abs().max()
    assert (fast.float().argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    for layer in cache.layers:
        if layer.memory is not None:
            for w in layer.memory.weights + layer.memory.momentum:
                assert w.dtype == torch.float32 and w.device.type == torch.device(device).type


def test_bf16_model_tracks_fp32_and_keeps_fp32_memory_state(variant):
    check_bf16_model_tracks_fp32(variant)


def test_training_path_equals_streaming_path(variant):
    """The stateless chunk-parallel path used in training and the stateful path used with a cache agree."""
    model = tiny_model(variant)
    ids = torch.randint(2, 64, (3, 45))
    with torch.no_grad():
        training = model(ids, use_cache=False).logits
        streaming = model(ids, past_key_values=TitansCache(model.config), use_cache=True).logits
    torch.testing.assert_close(training, streaming, atol=1e-5, rtol=0)


def _compiled_matches_eager(variant, backend, length, fullgraph=False, **overrides):
    # Short inputs keep the compile short; the scan itself is one operator of the graph at any length
    model = tiny_model(variant, **overrides).train()
    ids = torch.randint(2, 64, (2, length))
    eager = model(ids, labels=ids)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)(ids, labels=ids)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=0)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_torch_compile_training_step_matches_eager(variant):
    """Dynamo + AOTAutograd trace the memory around its scan operator and that operator's registered backward, as one
    graph (fullgraph: no host read anywhere in the step; MAC's segment cuts are known from the length alone)."""
    torch._dynamo.reset()
    # MAG: two whole memory chunks and a partial one, past the attention window. MAC: two whole segments
    _compiled_matches_eager(variant, "aot_eager", length=10 if variant == "mag" else 16, fullgraph=True)


def test_whole_model_traces_as_one_graph_with_padding_and_caches():
    """torch.compile(model, fullgraph=True), which refuses any graph break (MAG; MAL and LMM take the same paths; MAC
    cuts its segments where the positions say, which is data-dependent): training on an all-ones-masked and a
    left-padded batch (unmasked: test_torch_compile_training_step_matches_eager), and a cache continued from a padded
    prefill. Traced, the model takes its general paths where eager mode reads the host to pick a special case (a mask
    is taken as padding, the cached open chunk is joined by a gather, the memory runs over every slot); they must give
    what eager gives. The vocabulary check becomes an assertion in the graph: still a clear error. backend="aot_eager"
    runs the captured graph op by op: what is tested is the tracing (inductor: test_inductor_training_step_matches_eager)."""
    torch._dynamo.reset()
    model = tiny_model("mag", scale=0.1, num_hidden_layers=1, memory_layers=[0]).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(2, 64, (2, 21), generator=torch.Generator().manual_seed(8))
    padded = torch.ones_like(ids)
    padded[1, :6] = 0
    for mask in (torch.ones_like(ids), padded):  # (one graph: traced, a mask is always taken as padding)
        results = []
        for run in (model, compiled):
            out = run(ids, attention_mask=mask, labels=ids)
            out.loss.backward()
            results.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
            model.zero_grad()
        (eager_logits, eager_grads), (traced_logits, traced_grads) = results
        torch.testing.assert_close(traced_logits, eager_logits, atol=1e-5, rtol=0)
        for t, e in zip(traced_grads, eager_grads):
            torch.testing.assert_close(t, e, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 64\)"):
        compiled(ids.masked_fill(ids == ids[0, 3], 64), attention_mask=padded, labels=ids)

    model.eval()
    with torch.no_grad():
        caches = [TitansCache(model.config), TitansCache(model.config)]
        for cache in caches:  # the open chunk at a different phase in each row
            model(ids[:, :13], attention_mask=padded[:, :13], past_key_values=cache, use_cache=True)
        eager = model(ids[:, 13:], attention_mask=padded, past_key_values=caches[0], use_cache=True).logits
        traced = compiled(ids[:, 13:], attention_mask=padded, past_key_values=caches[1], use_cache=True).logits
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=0)
    want, got = caches[0].layers[0].memory.tensors(), caches[1].layers[0].memory.tensors()
    assert got.keys() == want.keys()
    real = torch.arange(model.config.memory_chunk_size)[None, None, :, None] < want["buffer_length"][:, None, None, None]
    for name in want:
        g, w = got[name], want[name]
        if name in ("buffer_k", "buffer_v", "buffer_gates"):  # slots past a row's length are never read
            g, w = g * real, w * real
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    """Generated kernels (stated tolerance 1e-4 on logits, gradients 1e-4 + 0.1 %), one layer."""
    torch._dynamo.reset()
    _compiled_matches_eager("mag", "inductor", length=10, num_hidden_layers=1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_compiled_chunk_scan_matches_eager(variant, monkeypatch):
    """TITANS_MEMORY_KERNEL=compile (each chunk's forward and hand-written backward through inductor, and the memory's
    elementwise functions) against the eager scan: a training step on a left-padded batch (rows closing different
    numbers of chunks) and a prefill of the same batch into a cache (the compiled chunk forward without autograd).
    The compiled decoding steps are test_compiled_decode_step_matches_eager's. Every distinct shape, stride or grad
    mode is one more inductor compile (each ~10-30 s on a cold 2-core CI machine), so this test keeps to those.
    Stated tolerances: logits 1e-5, gradients 1e-5 + 0.1 % (fp32 sums reassociated by the generated kernels)."""
    import modeling_titans

    torch._dynamo.reset()
    model = tiny_model(variant, scale=0.1).train()
    ids = torch.randint(2, 64, (3, 37), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :6], mask[2, :13] = 0, 0

    def step():
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out.logits.detach(), grads

    def prefill():
        with torch.no_grad():
            cache = TitansCache(model.config)
            logits = model.eval()(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        model.train()
        return logits, cache.tensors()

    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "torch")
    eager_logits, eager_grads = step()
    eager_prefill, eager_state = prefill()
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "compile")
    calls, used = [], set()
    compiled, compiled_function = modeling_titans._compiled_chunk_functions(), modeling_titans._compiled_function
    monkeypatch.setattr(modeling_titans, "_compiled_chunk_functions",
                        lambda: calls.append(1) or compiled)  # fmt: skip
    monkeypatch.setattr(modeling_titans, "_compiled_function",
                        lambda fn: used.add(fn.__name__) or compiled_function(fn))  # fmt: skip
    logits, grads = step()
    assert calls, "the compiled chunk functions were not used"
    elementwise = {"memory_qkv_activations", "memory_gates", "memory_chunk_coefficients", "memory_output_gate",
                   "memory_gate", *(["memory_read"] if variant == "mac" else [])}  # fmt: skip
    assert used == elementwise
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=0)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-3)
    calls.clear()
    prefilled, state = prefill()
    assert calls, "the prefill did not use the compiled chunk functions"
    torch.testing.assert_close(prefilled, eager_prefill, atol=1e-5, rtol=0)
    assert state.keys() == eager_state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, eager_state[name], atol=1e-5, rtol=0, msg=name)


def test_compiled_model_holds_the_scan_as_one_operator_at_any_length():
    """torch.compile captures the memory scan as one operator (`_MEMORY_SCAN_OP`), not as its chunk loop unrolled:
    the captured graphs of a training step hold as many products for 2 chunks as for 8 (the attention's masks do
    grow with the length). Unrolled, the graph and inductor's compile time grew with the number of chunks (MAG at
    4 x 1,024: 576 s to compile on a 2-core CPU)."""
    import collections

    graphs = []

    def backend(gm, example_inputs):  # records dynamo's graphs, runs them as traced
        graphs.append(gm)
        return gm.forward

    model = tiny_model("mag", num_hidden_layers=1).train()

    def captured(length):
        torch._dynamo.reset()
        graphs.clear()
        ids = torch.randint(2, 64, (2, length))
        torch.compile(model, backend=backend)(ids, labels=ids).loss.backward()
        modules = [m for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)]  # with subgraphs
        return collections.Counter(str(n.target) for m in modules for n in m.graph.nodes if n.op == "call_function")

    short, long = captured(8), captured(32)
    assert sum(count for target, count in short.items() if target.endswith(".memory_scan")) == 1
    products = lambda ops: {t: n for t, n in ops.items() if any(p in t for p in ("matmul", "bmm", "linear"))}  # noqa: E731
    assert products(short) == products(long)


def test_compiled_chunk_functions_trace_once_for_every_length(monkeypatch):
    """Under TITANS_MEMORY_KERNEL=compile every chunk reaches the compiled chunk functions in one layout, whatever the
    length it was cut from: one graph forward and one backward for inputs of 16, 24 and 32 tokens. Slices of the
    whole sequence carried its length in their strides, on which graphs guard: a graph per length (in one MAC step of
    a left-padded batch, 3 forward and 5 backward). Traced with dynamo's counting backend (no inductor, fast)."""
    import modeling_titans
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counters = CompileCounter(), CompileCounter()
    functions = (modeling_titans.memory_chunk_update, modeling_titans.memory_chunk_update_backward)
    compiled = tuple(torch.compile(fn, backend=counter) for fn, counter in zip(functions, counters))
    monkeypatch.setattr(modeling_titans, "_compiled_chunk_functions", lambda: compiled)
    monkeypatch.setattr(modeling_titans, "_compiled_function", lambda fn: fn)  # the elementwise functions stay eager
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "compile")
    model = tiny_model("mag").train()
    for length in (16, 24, 32):  # whole chunks of 4: the same shapes, other strides
        ids = torch.randint(2, 64, (2, length))
        model(ids, labels=ids).loss.backward()
    assert [counter.frame_count for counter in counters] == [1, 1]


def test_one_token_training_calls_keep_the_elementwise_functions_eager(monkeypatch):
    """Under TITANS_MEMORY_KERNEL=compile, a training call on one token (here MAC's one-token slices of a left-padded
    batch) runs the memory's elementwise functions eagerly: dynamo specialises a length of 1, so each function
    compiled a third time, forward and backward, for these rare small calls. Longer calls still reach the compiled
    functions. Checked on the calls (the compiled functions replaced by a recorder, no inductor)."""
    import modeling_titans

    model = tiny_model("mac", scale=0.1).train()
    ids = torch.randint(2, 64, (3, 37), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :6], mask[2, :13] = 0, 0  # rows closing their segments at other positions: some slices of one token
    taps = model.config.memory_conv_size - 1
    # the token axis of each function's first argument (q/k/v: the K-1 conv-state projections come first)
    lengths = {"memory_qkv_activations": lambda a: a.shape[1] - taps, "memory_chunk_coefficients": lambda a: a.shape[2]}
    compiled_calls, one_token_steps = [], []

    def recorder(fn):
        def call(*args, **kwargs):
            compiled_calls.append((fn.__name__, lengths.get(fn.__name__, lambda a: a.shape[1])(args[0])))
            return fn(*args, **kwargs)

        return call

    decode_step = modeling_titans.TitansNeuralMemory._decode_step
    monkeypatch.setattr(modeling_titans.TitansNeuralMemory, "_decode_step",
                        lambda self, x, state: one_token_steps.append(1) or decode_step(self, x, state))  # fmt: skip
    monkeypatch.setattr(modeling_titans, "_compiled_function", recorder)
    eager_chunks = modeling_titans.memory_chunk_update, modeling_titans.memory_chunk_update_backward
    monkeypatch.setattr(modeling_titans, "_compiled_chunk_functions", lambda: eager_chunks)
    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "compile")
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert one_token_steps, "the batch gave no one-token slice"
    assert {name for name, _ in compiled_calls} >= {"memory_qkv_activations", "memory_gates", "memory_read",
                                                    "memory_output_gate", "memory_gate"}  # fmt: skip
    assert all(length > 1 for _, length in compiled_calls), sorted(set(compiled_calls))


def test_compiled_conv_gets_its_taps_with_unit_stride(monkeypatch):
    """Under TITANS_MEMORY_KERNEL=compile the q/k/v function gets the ShortConv taps as a contiguous (K, C) copy of
    the (C, K) parameter: from the strided view inductor generated a scalar loop for the conv and its SiLU (forward
    3.5x slower at the anchor size). Checked on the arguments (no inductor here); a decoding step keeps the view."""
    import modeling_titans

    seen = []

    def compiled_function(fn):
        if fn is modeling_titans.memory_qkv_activations:
            return lambda padded, taps, *args: seen.append(taps) or fn(padded, taps, *args)
        return fn

    monkeypatch.setenv("TITANS_MEMORY_KERNEL", "compile")
    monkeypatch.setattr(modeling_titans, "_compiled_function", compiled_function)
    eager_chunks = (modeling_titans.memory_chunk_update, modeling_titans.memory_chunk_update_backward)
    monkeypatch.setattr(modeling_titans, "_compiled_chunk_functions", lambda: eager_chunks)
    model = tiny_model("mag").train()
    ids = torch.randint(2, 64, (2, 20))
    model(ids, labels=ids).loss.backward()
    conv = [layer.memory.conv_weight for layer in model.model.layers if hasattr(layer, "memory")]
    assert len(seen) == len(conv) > 0
    for taps, weight in zip(seen, conv):
        assert taps.shape == weight.shape[::-1] and taps.is_contiguous()
        assert torch.equal(taps, weight.t())
    assert all(weight.grad is not None and weight.grad.abs().sum() > 0 for weight in conv)


def check_compiled_decode_step_matches_eager(variant, monkeypatch, device="cpu"):
    """TITANS_MEMORY_KERNEL=compile runs a decoding step in one of two compiled forms: while the attention cache is
    still filling, each layer's one-token memory step (`_decode_update`) is one inductor graph; once every cache is
    full (`_steady_decoding`), all layers of the step are one graph. Against the eager steps, from the same prefilled
    cache of a left-padded batch (padding still inside the window, rows closing chunks and MAC segments at different
    steps): logits at every step and the whole cache after 10 steps, stated tolerance 1e-5."""
    import copy

    import modeling_titans

    torch._dynamo.reset()
    model = tiny_model(variant, scale=0.1).to(device)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(2, 64, (2, 5), generator=gen)  # 5 keys cached: 2 steps until the window-1 = 7 are there
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    steps = torch.randint(2, 64, (2, 10), generator=gen).to(device)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        prefilled = model(ids, attention_mask=mask, past_key_values=TitansCache(model.config), use_cache=True)

    def decode(mode):
        monkeypatch.setenv("TITANS_MEMORY_KERNEL", mode)
        cache, attention, logits = copy.deepcopy(prefilled.past_key_values), mask, []
        with torch.no_grad():
            for t in range(steps.shape[1]):
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
                out = model(steps[:, t : t + 1], attention_mask=attention, past_key_values=cache, use_cache=True)
                logits.append(out.logits)
        return torch.cat(logits, 1), cache.tensors()

    eager_logits, eager_state = decode("torch")
    layer_calls, step_calls = [], []
    layer_step, whole_step = modeling_titans._compiled_decode_update(), modeling_titans._compiled_decoding_step()
    monkeypatch.setattr(modeling_titans, "_compiled_decode_update", lambda: layer_calls.append(1) or layer_step)
    monkeypatch.setattr(modeling_titans, "_compiled_decoding_step", lambda: step_calls.append(1) or whole_step)
    logits, state = decode("compile")
    filling = 0 if variant == "lmm" else 2  # LMM has no attention cache to fill
    assert len(layer_calls) == filling * len(model.config.memory_layers), "the compiled memory step was not used"
    assert len(step_calls) == 10 - filling, "the compiled whole decoding step was not used"
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=0)
    assert state.keys() == eager_state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, eager_state[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mag", "mac", "mal", "lmm"])
def test_compiled_decode_step_matches_eager(variant, monkeypatch):
    check_compiled_decode_step_matches_eager(variant, monkeypatch)


@pytest.mark.parametrize("variant", ["mac", "mag", "lmm"])
def test_steady_decoding_is_one_graph_for_every_prompt_length(variant, monkeypatch):
    """The whole-step decoding graph is traced once: prompts of different lengths leave their caches in one layout
    (prefill's slices would otherwise differ in strides), MAC's segment-start weights never alias the memory's (as they
    do after a prefill), and a memory whose first chunk is still open (M_0 a view of the parameters, requires_grad)
    enters the graph like any other, so nothing recompiles. Traced with dynamo's counting backend (no inductor, fast);
    generated tokens equal the eager ones."""
    import modeling_titans
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(modeling_titans.TitansModel._decoding_step, backend=counter, dynamic=False)
    monkeypatch.setattr(modeling_titans, "_compiled_decoding_step", lambda: step)
    eager_chunks = (modeling_titans.memory_chunk_update, modeling_titans.memory_chunk_update_backward)
    monkeypatch.setattr(modeling_titans, "_compiled_chunk_functions", lambda: eager_chunks)  # prefill stays eager
    model = tiny_model(variant, scale=0.1, memory_chunk_size=8)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for length in (7, 23, 14):  # >= window - 1: every cache is full after the prompt; 7 < one chunk of 8
            ids = torch.randint(2, 64, (1, length), generator=gen)
            monkeypatch.setenv("TITANS_MEMORY_KERNEL", "torch")
            eager = model.generate(ids, max_new_tokens=7, do_sample=False)
            monkeypatch.setenv("TITANS_MEMORY_KERNEL", "compile")
            assert model.generate(ids, max_new_tokens=7, do_sample=False).tolist() == eager.tolist()
    assert counter.frame_count == 1, f"the decoding step was traced {counter.frame_count} times"
    assert counter.op_count > 0


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_training_trims_the_heap_on_large_inputs_only(variant, monkeypatch):
    """On a large CPU training input, free heap pages go back to the OS (glibc malloc_trim) after each decoder layer,
    and in MAC also every `_TRIM_SEGMENTS` segments; never without autograd or below the size bound, and never with
    TITANS_MALLOC_TRIM=0. The loss is the same with and without it."""
    import modeling_titans

    if modeling_titans._malloc_trim() is None:
        pytest.skip("not glibc")
    model = tiny_model(variant).train()
    ids = torch.randint(2, 64, (2, 8 * 9))  # MAC: 9 segments of 8 tokens per layer
    calls = []
    real = modeling_titans._malloc_trim()
    monkeypatch.setattr(modeling_titans, "_malloc_trim", lambda: lambda pad: calls.append(pad) or real(pad))
    monkeypatch.setattr(modeling_titans, "_TRIM_SEGMENTS", 4)
    monkeypatch.setattr(modeling_titans, "_TRIM_MIN_ELEMENTS", ids.numel() * model.config.hidden_size)
    trimmed = model(ids, labels=ids).loss
    per_layer = 1 + (2 if variant == "mac" else 0)  # after the layer; MAC also after segments 4 and 8
    assert len(calls) == per_layer * model.config.num_hidden_layers
    with torch.no_grad():
        model(ids, labels=ids)
    monkeypatch.setenv("TITANS_MALLOC_TRIM", "0")
    plain = model(ids, labels=ids).loss
    monkeypatch.delenv("TITANS_MALLOC_TRIM")
    monkeypatch.setattr(modeling_titans, "_TRIM_MIN_ELEMENTS", ids.numel() * model.config.hidden_size + 1)
    model(ids, labels=ids)
    assert len(calls) == per_layer * model.config.num_hidden_layers
    assert torch.equal(trimmed, plain)


@pytest.mark.parametrize("conv_size", [4, 0])
def test_pieces_of_long_inputs_equal_one_piece(variant, monkeypatch, conv_size):
    """Position-wise work, the short conv and the chunk coefficients of long inputs go by pieces (`_PIECE_ELEMENTS`):
    same loss, logits and gradients as in one piece, with and without padding (compaction) and a cache."""
    import modeling_titans

    model = tiny_model(variant, memory_conv_size=conv_size).train()
    ids = torch.randint(2, 64, (2, 45))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0

    def run(**kwargs):
        out = model(ids, labels=ids, **kwargs)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out.logits, grads

    for kwargs in ({"use_cache": False}, {"attention_mask": mask, "use_cache": True}):
        monkeypatch.setattr(modeling_titans, "_PIECE_ELEMENTS", 1 << 30)
        one_logits, one_grads = run(**kwargs)
        monkeypatch.setattr(modeling_titans, "_PIECE_ELEMENTS", 2 * 9 * 32)  # pieces of 9 tokens, of 9 chunks
        logits, grads = run(**kwargs)
        torch.testing.assert_close(logits, one_logits, atol=1e-5, rtol=0)
        for g, one in zip(grads, one_grads):
            torch.testing.assert_close(g, one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mag", "mal", "lmm"])  # (MAC's segment cuts read the positions: no meta run)
def test_pieces_are_cpu_only(variant, monkeypatch):
    """The pieces answer glibc's heap: off the CPU (here the meta device, which runs the same Python without data)
    a long input goes through the attention, MLP, conv and chunk coefficients in one call each, as on the CPU with
    pieces larger than the input; the CPU with small pieces makes more calls."""
    import modeling_titans

    counted = {}

    def spy(owner, name):
        original, key = getattr(owner, name), f"{owner.__name__}.{name}"

        def wrapper(*args, **kwargs):
            counted[key] = counted.get(key, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for owner, name in [(modeling_titans.TitansAttention, "forward"), (modeling_titans.TitansMLP, "forward"),
                        (modeling_titans.TitansNeuralMemory, "_qkv"), (modeling_titans, "memory_chunk_coefficients")]:
        spy(owner, name)
    model = tiny_model(variant).train()

    def calls(device, piece_elements):
        monkeypatch.setattr(modeling_titans, "_PIECE_ELEMENTS", piece_elements)
        counted.clear()
        x = torch.randn(2, 45, model.config.hidden_size, device=device, requires_grad=True)
        model.to(device)(inputs_embeds=x, use_cache=False).logits.sum().backward()
        return dict(counted)

    one_piece, pieces = calls("cpu", 1 << 30), calls("cpu", 2 * 9 * 32)
    assert all(pieces[name] > n for name, n in one_piece.items()), (one_piece, pieces)
    assert calls("meta", 2 * 9 * 32) == one_piece


def check_autocast_leaves_the_memory_in_fp32(variant, device="cpu"):
    """Under torch.autocast (Trainer --bf16) the inner optimisation stays fp32 (model card D16): the memory scan gives
    bit-identical results with and without autocast, while the rest of the model runs in bf16 and tracks fp32."""
    from modeling_titans import memory_scan

    model = tiny_model(variant, scale=0.1).train().to(device)  # (at scale 0.3 the random attention is so sharp that
    layer = next(layer for layer in model.model.layers if layer.memory is not None).memory  # bf16 moves it)
    autocast = lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)  # noqa: E731
    x = torch.randn(2, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        q, k, v, _ = layer._qkv(x, None)
        gates = layer._gates(x)
        weights = tuple(w.unsqueeze(0).expand(2, *w.shape) for w in layer.memory_weights)
        args = (weights, tuple(torch.zeros_like(w) for w in weights), q, k, v, *gates.unbind(-1), layer.chunk_size,
                layer.activation)  # fmt: skip
        plain = memory_scan(*args, initial=layer._initial_weights())
        with autocast():
            mixed = memory_scan(*args, initial=layer._initial_weights())
    for a, b in zip((plain[0], *plain[1], *plain[2]), (mixed[0], *mixed[1], *mixed[2])):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=0, rtol=0)

    ids = torch.randint(2, 64, (2, 24), generator=torch.Generator().manual_seed(2)).to(device)
    reference = model(ids, labels=ids)
    reference.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with autocast():
        out = model(ids, labels=ids)
    out.loss.backward()
    # bf16 projections/attention: stated tolerance 1% on the loss; the whole gradient (all parameters as one vector)
    # keeps cosine >= 0.999 with fp32 (measured 0.9998-0.9999; single small gradients are bf16 noise)
    assert abs(out.loss.item() - reference.loss.item()) <= 0.01 * reference.loss.item()
    mixed = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(mixed).all()
    assert F.cosine_similarity(mixed, torch.cat([g.flatten() for g in grads]), dim=0) >= 0.999


def test_autocast_leaves_the_memory_in_fp32(variant):
    check_autocast_leaves_the_memory_in_fp32(variant)


def test_cpu_training_rms_norm_matches_the_composite_and_keeps_less():
    """The hand-written RMSNorm backward (fp32, CPU, autograd on) against F.rms_norm's own autograd: same output,
    gradients to rounding, one graph node instead of six, and an fp64 gradcheck of the formula."""
    from modeling_titans import _RMSNormFunction, rms_norm

    gen = torch.Generator().manual_seed(0)
    x = (3.0 * torch.randn(3, 7, 64, generator=gen)).requires_grad_()
    w = torch.randn(64, generator=gen).requires_grad_()
    ours, theirs = rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6)
    assert type(ours.grad_fn).__name__ == "_RMSNormFunctionBackward"
    assert torch.equal(ours, theirs)
    grad = torch.randn(ours.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, (x, w), grad), torch.autograd.grad(theirs, (x, w), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a frozen weight (no weight gradient computed): the input gradient still matches
    ours_x = torch.autograd.grad(rms_norm(x, w.detach(), 1e-6), x, grad)[0]
    torch.testing.assert_close(ours_x, torch.autograd.grad(F.rms_norm(x, (64,), w.detach(), 1e-6), x, grad)[0],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with torch.no_grad():  # inference keeps the single F.rms_norm call
        assert rms_norm(x, w, 1e-6).grad_fn is None
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6)[0], (x64[:1, :2], w64))

    def per_sample(norm):  # torch.func transforms (per-sample gradients) work through it, as through F.rms_norm
        return torch.func.vmap(torch.func.grad(lambda v, row: norm(row, v).square().sum()), (None, 0))(w, x.detach())

    ours_per_sample = per_sample(lambda r, v: rms_norm(r, v, 1e-6))
    theirs_per_sample = per_sample(lambda r, v: F.rms_norm(r, (64,), v, 1e-6))
    torch.testing.assert_close(ours_per_sample, theirs_per_sample, rtol=1e-5, atol=1e-6)


def test_memory_kernel_settings_are_validated(monkeypatch):
    """The fused kernels' settings (read at import): a bad value stops the import with an error naming the variable,
    good ones reach the launch arguments (default: tf32x3 products and 8 warps at E = 128). Each setting runs the
    module's code afresh, as a private module (one subprocess per import cost ~5 s each)."""
    import importlib.util

    import modeling_titans as mt

    def load(**values):
        for name in [k for k in os.environ if k.startswith("TITANS_MEMORY_KERNEL_")]:
            monkeypatch.delenv(name)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        spec = importlib.util.spec_from_file_location("titans_settings_check", mt.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    for name, bad in (("TITANS_MEMORY_KERNEL_PRECISION", "fp16"), ("TITANS_MEMORY_KERNEL_WARPS", "3"),
                      ("TITANS_MEMORY_KERNEL_BLOCK", "24")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            load(**{name: bad})
    ok = load(TITANS_MEMORY_KERNEL_PRECISION="tf32", TITANS_MEMORY_KERNEL_WARPS="4", TITANS_MEMORY_KERNEL_BLOCK="32")
    assert (ok._TRITON_PRECISION, ok._triton_warps(128)) == ("tf32", 4)
    # the blocked kernels only for depth 2 and a block narrower than the hidden width
    assert (ok._triton_block(2, 128), ok._triton_block(2, 32), ok._triton_block(1, 128)) == (32, None, None)
    default = load()
    assert (default._TRITON_PRECISION, default._triton_warps(128), default._triton_warps(64)) == ("tf32x3", 8, 4)
    assert default._triton_block(2, 128) is None
