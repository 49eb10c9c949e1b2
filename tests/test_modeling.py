"""TitansForCausalLM: every variant trains, padding is exact, attention backends agree, config errors are clear."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, VARIANTS, assert_reloaded_logits, tiny_config, tiny_model

from configuration_titans import TitansConfig
from modeling_titans import TitansForCausalLM


def test_loss_finite_and_every_parameter_gets_a_gradient(variant):
    model = tiny_model(variant).train()
    ids = torch.randint(2, 64, (2, 29))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("ablation", [dict(memory_use_momentum=False), dict(memory_use_forgetting=False), dict(memory_depth=1)])
def test_ablations_train(ablation):
    model = tiny_model("mag", **ablation).train()
    ids = torch.randint(2, 64, (2, 21))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters())


def test_loss_decreases_on_a_fixed_batch(variant):
    torch.manual_seed(0)
    model = TitansForCausalLM(tiny_config(variant)).train()
    ids = torch.randint(2, 64, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_labels_ignore_index_and_num_items_in_batch():
    model = tiny_model("mag")
    ids = torch.randint(2, 64, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    logits = model(ids).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels=labels).loss, manual)
    summed = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss, summed / 100)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 5e-5), (torch.float64, 1e-12)])
def test_padded_batches_match_each_sequence_alone(variant, dtype, atol):
    # fp32: a batch of two and a batch of one can take different BLAS kernels (seen with MKL on an AVX-512 AMD CPU:
    # 1.4e-5 on MAC logits of size ~7, through two memory layers); in fp64 the same comparison agrees to ~1e-15
    model = tiny_model(variant).to(dtype)
    a, b = torch.randint(2, 64, (1, 27)), torch.randint(2, 64, (1, 19))
    with torch.no_grad():
        ref_a, ref_b = model(a).logits[0], model(b).logits[0]
        for side in ("left", "right"):
            ids = torch.zeros(2, 27, dtype=torch.long)
            mask = torch.zeros(2, 27, dtype=torch.long)
            ids[0], mask[0] = a[0], 1
            sl = slice(27 - 19, 27) if side == "left" else slice(0, 19)
            ids[1, sl], mask[1, sl] = b[0], 1
            logits = model(ids, attention_mask=mask).logits
            torch.testing.assert_close(logits[0], ref_a, atol=atol, rtol=0)
            torch.testing.assert_close(logits[1, sl], ref_b, atol=atol, rtol=0)
            if side == "left":  # the padding really matters: without the mask the logits differ
                assert (model(ids).logits[1, sl] - ref_b).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["sdpa", "flex_attention"])
def test_attention_backends_match_eager(variant, impl):
    if variant == "lmm":
        pytest.skip("memory-only: no attention")
    _assert_attention_matches_eager(tiny_model(variant, scale=0.1), impl, length=30, padding=4)


def _assert_attention_matches_eager(model, impl, length, padding):
    """Logits under `impl` equal eager's on a batch of two, one row left-padded (skips where `impl` is unavailable)."""
    ids = torch.randint(2, 64, (2, length))
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).logits
        try:
            model.set_attn_implementation(impl)
        except (ImportError, ValueError) as err:
            pytest.skip(f"{impl} unavailable here: {err}")
        other = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(other[mask.bool()], eager[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_cached", [0, 5])
@pytest.mark.parametrize("pattern", ["window", "segment"])
def test_flex_mask_function_equals_the_dense_mask(pattern, num_cached):
    """The flex path's mask function (per-row/column tensors, no dense mask) against `titans_attention_mask`, the
    dense mask of sdpa/eager: left padding, rows at different phases, cached keys; MAC's [persistent | retrieved |
    keys] axis with its lookback. Columns and rows past the ends (flex pads to its block size) are never visible."""
    from modeling_titans import titans_attention_mask, titans_block_mask, titans_mask_function

    n_p, window, lookback, q_len = 3, 6, 4, 21
    q_pos = torch.arange(q_len).repeat(3, 1) + num_cached + torch.tensor([[0], [2], [0]])  # row 1: 2 tokens ahead
    q_pos[2, :7] = -1  # row 2: left padding
    q_pos[2, 7:] -= 7 + num_cached
    kv_pos = torch.cat([torch.arange(num_cached).repeat(3, 1) + torch.tensor([[0], [2], [0]]), q_pos], dim=1)
    kv_pos[2, :num_cached] = -1
    if pattern == "window":
        dense = titans_attention_mask(q_pos, kv_pos, num_cached, n_p, window=window)[:, 0]
        function = titans_mask_function(q_pos, kv_pos, num_cached, n_p, window=window)
    else:
        keys = titans_attention_mask(q_pos, kv_pos, num_cached, 0, segment=window)[:, 0]
        retrieved = titans_attention_mask(q_pos, kv_pos, num_cached, 0, segment=window, lookback=lookback)[:, 0]
        retrieved &= (q_pos >= 0)[:, :, None]
        dense = torch.cat([keys.new_ones(3, q_len, n_p), retrieved, keys], dim=-1)
        function = titans_mask_function(q_pos, kv_pos, num_cached, n_p, segment=window, context=True, lookback=lookback)
    assert dense[:, :, n_p:].any() and not dense.all()  # (the pattern is not trivial)
    grid = function(torch.arange(3)[:, None, None], 0, torch.arange(128)[None, :, None], torch.arange(128)[None, None])
    assert torch.equal(grid[:, :q_len, : dense.shape[-1]], dense)
    assert not grid[:, :, dense.shape[-1] :].any()
    # the BlockMask built from block position ranges keeps exactly the blocks with a visible pair (none missed,
    # none extra), at block sizes that cut the rows, the padding and the [persistent | retrieved | keys] parts
    reach = {"window": window} if pattern == "window" else {"segment": window, "context": True, "lookback": lookback}
    for block in (4, 8, 16):
        block_mask = titans_block_mask(q_pos, kv_pos, num_cached, n_p, block=block, **reach)
        assert block_mask.seq_lengths == tuple(dense.shape[1:])
        n_q, n_k = -(-q_len // block), -(-dense.shape[-1] // block)
        padded = F.pad(dense, (0, n_k * block - dense.shape[-1], 0, n_q * block - q_len))
        needed = padded.view(3, n_q, block, n_k, block).any(4).any(2)
        assert torch.equal(block_mask.to_dense()[:, 0].bool(), needed)


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_flex_attention_over_several_blocks_matches_eager(variant, monkeypatch):
    """flex with the BlockMask of `titans_block_mask` against eager attention where the mask spans several of flex's
    128-token blocks: 300 tokens, left padding of 140 in one row (a whole block of padding queries and one cut).
    A short input first, so that the long one recompiles flex for a second length in the same process. On the CPU
    flex gets queries and keys in whole blocks (`_FLEX_BLOCK`: partial ones gave NaN on an AVX2 CPU)."""
    from modeling_titans import _FLEX_BLOCK, ALL_ATTENTION_FUNCTIONS

    lengths, flex_attention = [], ALL_ATTENTION_FUNCTIONS["flex_attention"]

    def spy(module, query, key, value, *args, **kwargs):
        lengths.append((query.shape[2], key.shape[2]))
        return flex_attention(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flex_attention", spy)
    model = tiny_model(variant, scale=0.1)
    for length, padding in ((30, 4), (300, 140)):
        _assert_attention_matches_eager(model, "flex_attention", length, padding)
    assert lengths and all(q % _FLEX_BLOCK == 0 and k % _FLEX_BLOCK == 0 for q, k in lengths), lengths


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_flex_attention_generation_matches_sdpa(variant):
    """Cached greedy generation with flex (a BlockMask per step, one query over the cached keys, left padding) gives
    the tokens of sdpa."""
    model = tiny_model(variant, scale=0.1).eval()
    ids = torch.randint(2, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    tokens = {}
    for impl in ("sdpa", "flex_attention"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(tokens["flex_attention"], tokens["sdpa"])


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex_attention"])
def test_mac_attention_reach(impl):
    """MAC's attention over [persistent | h | x] (D20): with "segment" (the paper's) the first query of a segment
    depends on no earlier token; with "sliding" it sees the window-1 tokens before it, across the segment start, and
    no further."""
    config = tiny_config("mac", attn_implementation=impl)
    window = config.attention_window
    outputs = {}
    for reach in ("segment", "sliding"):
        torch.manual_seed(0)
        model = TitansForCausalLM(tiny_config("mac", mac_attention=reach, attn_implementation=impl)).eval()
        attention, rotary = model.model.layers[0].self_attn, model.model.rotary_emb
        x = torch.randn(1, 3 * window, config.hidden_size, generator=torch.Generator().manual_seed(1))
        positions = torch.arange(3 * window)[None]
        with torch.no_grad():
            outputs[reach] = []
            for changed in (None, window, window + 2):  # a token w before / w-2 before query 2w
                xc = x.clone()
                if changed is not None:
                    xc[:, changed] += 1.0
                embeddings = rotary(xc, position_ids=positions)
                out, _ = attention(xc, embeddings, positions, None, context=torch.zeros_like(xc))
                outputs[reach].append(out[0, 2 * window])
    base, far, near = outputs["segment"]
    assert torch.equal(base, far) and torch.equal(base, near)  # the segment start sees only itself
    base, far, near = outputs["sliding"]
    assert torch.equal(base, far) and not torch.allclose(base, near)  # window-1 tokens back, across the start


def test_mac_attention_setting_is_validated():
    with pytest.raises(ValueError, match="mac_attention"):
        tiny_config("mac", mac_attention="global")
    with pytest.raises(ValueError, match="mac_attention"):
        tiny_config("mag", mac_attention="sliding")


def test_flash_attention_is_refused_clearly():
    model = tiny_model("mag")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        model(torch.randint(2, 64, (1, 5)))


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every_n_layers):
    """`activation_checkpointing_enable` (Transformers 5.23's name; `every_n_layers` checkpoints layers 0, n, 2n, ...):
    the checkpointed layers run their forward twice (counted), and the gradients are those without checkpointing."""
    ids = torch.randint(2, 64, (2, 20))
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model("mac", num_hidden_layers=3, memory_layers=[0, 1, 2]).train()
        if checkpointing:
            model.activation_checkpointing_enable(every_n_layers=every_n_layers)
        count = [0] * len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            # (on a sublayer: the recomputation calls the layer's forward under its own __call__'s checkpoint)
            layer.mlp.register_forward_pre_hook(lambda module, args, i=i: count.__setitem__(i, count[i] + 1))
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        calls.append(count)
    assert calls[0] == [1, 1, 1]
    assert calls[1] == [2 if i % every_n_layers == 0 else 1 for i in range(3)], calls[1]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_training_makes_no_cache_unless_asked(variant):
    """In train mode the default `use_cache` makes no cache (the memory layers need not return their states); asked
    for, or in eval mode, there is one. The loss and gradients are the same either way."""
    from modeling_titans import TitansCache

    model = tiny_model(variant).train()
    ids = torch.randint(2, 64, (2, 37), generator=torch.Generator().manual_seed(3))
    results = []
    for kwargs in ({}, {"use_cache": True}):
        out = model(ids, labels=ids, **kwargs)
        out.loss.backward()
        results.append((out, torch.cat([p.grad.flatten() for p in model.parameters()])))
        model.zero_grad()
    (default, default_grad), (cached, cached_grad) = results
    assert default.past_key_values is None and isinstance(cached.past_key_values, TitansCache)
    torch.testing.assert_close(default.loss, cached.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(default_grad, cached_grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert isinstance(model.eval()(ids).past_key_values, TitansCache)


def test_sequence_length_is_not_capped():
    model = tiny_model("mag", max_position_embeddings=16)
    with torch.no_grad():
        logits = model(torch.randint(2, 64, (1, 70))).logits
    assert logits.shape == (1, 70, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("variant", "mamba", "mac"),
        ("hidden_size", 0, "positive"),
        ("num_hidden_layers", -1, "positive"),
        ("attention_window", 0, "positive"),
        ("memory_chunk_size", 0, "positive"),
        ("memory_depth", 0, "positive"),
        ("num_memory_heads", 0, "positive"),
        ("memory_head_dim", 2.5, "positive"),
        ("num_persistent_tokens", -1, "non-negative"),
        ("memory_conv_size", -2, "non-negative"),
        ("memory_max_lr", 0.0, "positive"),
        ("memory_activation", "relu6", "silu"),
        ("memory_layers", [0, 7], "distinct layer indices"),
        ("num_key_value_heads", 3, "multiple"),
        ("rope_theta", -1.0, "positive"),
    ],
)
def test_bad_config_values_raise(field, value, allowed):
    with pytest.raises(ValueError, match=field) as err:
        TitansConfig(**{field: value})
    assert allowed in str(err.value)


def test_rope_scaling_is_refused_and_rope_parameters_must_agree():
    for rope in ({"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}):
        with pytest.raises(ValueError, match="RoPE scaling"):
            TitansConfig(rope_scaling=rope)
    with pytest.raises(ValueError, match="rope_theta=500000"):
        TitansConfig(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config = TitansConfig(rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    rotary = TitansForCausalLM(tiny_config("mag", rope_theta=500000.0)).model.rotary_emb
    assert config.rope_theta == 500000.0
    half = rotary.inv_freq.shape[0]  # inv_freq[i] = theta^(-2i / head_dim)
    torch.testing.assert_close(rotary.inv_freq[1], torch.tensor(500000.0 ** (-1 / half)))


def test_mac_needs_chunk_dividing_segment_and_lmm_needs_memory():
    with pytest.raises(ValueError, match="memory_chunk_size"):
        TitansConfig(variant="mac", attention_window=30, memory_chunk_size=8)
    with pytest.raises(ValueError, match="num_memory_tokens"):
        TitansConfig(variant="mag", num_memory_tokens=4)
    with pytest.raises(ValueError, match="memory_layers"):
        TitansConfig(variant="lmm", memory_layers=[])


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_mac_reads_each_segment_with_the_memory_before_it(monkeypatch, grad):
    """Eq. 21-24: segment s attends to h = M*_{s-1}(q(x_s)), the memory after the attention outputs y of segments < s
    (the initial memory at the first), read with the queries of the segment's own input; y_s is then written into it.
    Rebuilt here from the attention's inputs and outputs, segment by segment, with the memory module alone (under
    autograd the read-out runs inside a checkpoint)."""
    model = tiny_model("mac", scale=0.1)
    layer = next(layer for layer in model.model.layers if layer.mode == "mac")
    seen, attend = [], layer.self_attn.forward

    def spy(x, position_embeddings, positions, cache, context=None, **kwargs):
        out = attend(x, position_embeddings, positions, cache, context=context, **kwargs)
        seen.append((x, context, out[0]))
        return out

    monkeypatch.setattr(layer.self_attn, "forward", spy)
    window = model.config.attention_window
    with torch.set_grad_enabled(grad):
        model(torch.randint(2, 64, (2, 3 * window), generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        assert [x.shape[1] for x, _, _ in seen] == [window] * 3
        assert all(context.requires_grad == grad for _, context, _ in seen)
        state = layer.memory.initial_state(2, torch.device("cpu"), torch.float32)
        for x, context, y in seen:
            expected = layer.memory.read(layer.memory.q_proj(x), layer.memory.g_proj(x), state.weights)
            torch.testing.assert_close(context, expected, atol=1e-6, rtol=0)
            _, state = layer.memory(y, None, state, return_state=True)


def test_config_round_trip():
    config = tiny_config("mac", num_memory_tokens=3, memory_layers=[1])
    again = TitansConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.memory_layers == [1] and again.num_memory_tokens == 3


def test_out_of_range_token_ids_raise():
    model = tiny_model("mag")
    for bad in (64, -1):
        ids = torch.tensor([[3, 4, bad]])
        with pytest.raises(ValueError, match=f"token id {bad}"):
            model(ids)


def test_bad_input_ids_and_embeds_raise_and_other_float_embeds_are_cast():
    model = tiny_model("mag")
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.float32"):
        model(torch.randint(2, 64, (2, 5)).float())
    for bad in (torch.randn(2, 5, 33), torch.randn(2, 5)):
        with pytest.raises(ValueError, match="hidden_size=32"):
            model(inputs_embeds=bad)
    with pytest.raises(ValueError, match="floating point"):
        model(inputs_embeds=torch.ones(2, 5, 32, dtype=torch.long))
    embeds = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds.double()).logits, model(inputs_embeds=embeds).logits)


def test_bad_attention_mask_shape_raises():
    model = tiny_model("mag")
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(2, 64, (2, 5)), attention_mask=torch.ones(2, 7))


def test_bad_shapes_of_ids_positions_and_labels_raise():
    """Shapes the model cannot read are refused by name, not by an unpacking or broadcasting error deep inside."""
    model = tiny_model("mag")
    ids = torch.randint(2, 64, (2, 5))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\), got shape \(5,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="no tokens"):
        model(ids[:, :0])
    for bad in (torch.arange(3)[None], torch.arange(5), torch.arange(5).expand(3, 5)):
        with pytest.raises(ValueError, match=r"position_ids must be \(batch, length\) = \(2, 5\)"):
            model(ids, position_ids=bad)
    with pytest.raises(ValueError, match=r"labels must be \(batch, length\) like the logits, \(2, 5\), got \(2, 4\)"):
        model(ids, labels=ids[:, :4])
    with torch.no_grad():  # the accepted forms give the same logits: (1, T) broadcast over the batch, or (B, T)
        one = model(ids, position_ids=torch.arange(5)[None]).logits
        torch.testing.assert_close(model(ids, position_ids=torch.arange(5).expand(2, 5)).logits, one)
        torch.testing.assert_close(model(ids).logits, one)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_are_each_layers_output(variant):
    model = tiny_model(variant).eval()
    ids = torch.randint(2, 64, (2, 21))
    seen = []  # the reference: each decoder layer's output, taken by forward hooks
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out)) for layer in model.model.layers]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        picked = model(ids, output_hidden_states=[0, -2])
        # one decoding step after a prefill gives the last position's states of the whole forward
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values, output_hidden_states=True)
    for h in hooks:
        h.remove()
    n = model.config.num_hidden_layers
    states = out.hidden_states
    assert len(states) == n + 1
    torch.testing.assert_close(states[0], model.model.embed_tokens(ids))
    for i in range(n - 1):
        torch.testing.assert_close(states[i + 1], seen[i])
    torch.testing.assert_close(states[-1], model.model.norm(seen[n - 1]))
    assert [h is None for h in picked.hidden_states] == [False] + [True] * (n - 2) + [False, True]
    torch.testing.assert_close(picked.hidden_states[0], states[0])
    torch.testing.assert_close(picked.hidden_states[-2], states[-2])
    for full, one in zip(states, step.hidden_states):
        torch.testing.assert_close(one, full[:, -1:], atol=1e-5, rtol=1e-4)


def test_output_attentions_is_refused_clearly():
    model = tiny_model("mag")
    model.set_attn_implementation("eager")  # the backend that would have weights to return
    ids = torch.randint(2, 64, (1, 9))
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    model.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids)


def test_packed_sequences_are_refused_and_generate_position_ids_pass():
    from transformers import DataCollatorWithFlattening

    model = tiny_model("mag").train()
    batch = DataCollatorWithFlattening()([{"input_ids": [3, 4, 5, 6, 7]}, {"input_ids": [8, 9, 10]}])
    with pytest.raises(ValueError, match="packed sequences"):
        model(**batch)
    ids = torch.randint(2, 64, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    # generate()'s position ids: cumsum - 1, with 1 at the pads (not a restart); the same logits as our own positions
    given = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=mask, position_ids=given).logits[mask.bool()],
            model(ids, attention_mask=mask).logits[mask.bool()],
        )


@pytest.mark.slow
def test_save_and_reload_in_a_fresh_process(tmp_path):
    model = tiny_model("mac")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_titans.TitansForCausalLM"
    assert (tmp_path / "modeling_titans.py").exists() and (tmp_path / "model.safetensors").exists()
    ids = torch.randint(2, 64, (2, 23))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "d = sys.argv[1]\n"
        "m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "with torch.no_grad(): got = m(torch.load(d + '/ids.pt')).logits\n"
        "torch.save(got, d + '/got.pt')\n"
        "print('LOADED')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "LOADED" in result.stdout, result.stderr[-3000:]
    assert_reloaded_logits(torch.load(tmp_path / "got.pt"), torch.load(tmp_path / "expected.pt"))
