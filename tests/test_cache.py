"""TitansCache: cached generation is exactly uncached generation, in every generate() mode, with bounded state."""

import os
import re

import pytest
import torch
from conftest import ROOT, tiny_model
from transformers import DynamicCache, TextStreamer

from modeling_titans import TitansCache


WINDOW, CHUNK = 8, 4  # tiny_config: attention_window=8, memory_chunk_size=4


def _prompt(length, seed=0):
    return torch.randint(2, 64, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt_len", [1, 5, CHUNK, WINDOW, 4 * WINDOW + 3])
def test_prefill_then_decode_matches_full_forward(variant, prompt_len):
    model = tiny_model(variant)
    ids = _prompt(prompt_len + 24, seed=prompt_len)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = TitansCache(model.config)
        out = model(ids[:, :prompt_len], past_key_values=cache, use_cache=True)
        assert (out.logits[:, -1] - full[:, prompt_len - 1]).abs().max() <= 1e-4
        for t in range(prompt_len, ids.shape[1]):
            step = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            assert (step.logits[:, -1] - full[:, t]).abs().max() <= 1e-4, t
            out = step



@pytest.mark.parametrize("prompt_len", [1, 5, 4 * WINDOW + 3])
def test_mac_one_token_steps_see_their_segment_and_lookback(prompt_len):
    """One-token MAC steps attend over the last keys of their segment (and retrieved tokens within
    `num_memory_tokens`) without a mask when every row is at the same phase: two rows of the same length, lookback
    3 < window 8, against the full forward's masked attention."""
    model = tiny_model("mac", num_memory_tokens=3)
    ids = torch.randint(2, 64, (2, prompt_len + 2 * WINDOW), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prompt_len], past_key_values=TitansCache(model.config), use_cache=True)
        for t in range(prompt_len, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            assert (out.logits[:, -1] - full[:, t]).abs().max() <= 1e-4, t

def test_mac_continuation_with_right_padding_stays_in_its_segment():
    """A MAC call of one segment's length skips the cached keys only when it starts a segment in every row. Here the
    row continues its first segment (3 cached tokens), then 3 real tokens and right padding fill the window."""
    model = tiny_model("mac")
    ids = _prompt(WINDOW + 3, seed=3)
    with torch.no_grad():
        full = model(ids[:, :6]).logits
        out = model(ids[:, :3], past_key_values=TitansCache(model.config), use_cache=True)
        mask = torch.tensor([[1] * 6 + [0] * (WINDOW - 3)])
        continued = model(ids[:, 3:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(continued[:, :3], full[:, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_len", [1, 5, 4 * WINDOW + 3])
def test_sliding_mac_prefill_then_decode_matches_full_forward(prompt_len):
    """mac_attention="sliding" (model card D20): the attention's window crosses segment starts, so a one-token step
    needs the previous segment's keys and retrieved tokens from the cache. Two rows at different phases (one left
    padded), num_memory_tokens 3: prefill plus one-token steps against the full forward."""
    model = tiny_model("mac", mac_attention="sliding", num_memory_tokens=3)
    ids = torch.randint(2, 64, (2, prompt_len + 2 * WINDOW), generator=torch.Generator().manual_seed(prompt_len))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len],
                    past_key_values=TitansCache(model.config), use_cache=True)  # fmt: skip
        for t in range(prompt_len, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values,
                        use_cache=True)  # fmt: skip
            assert (out.logits[0, -1] - full[0, t]).abs().max() <= 1e-4, t
            if t >= 3:
                assert (out.logits[1, -1] - full[1, t]).abs().max() <= 1e-4, t


def test_sliding_mac_greedy_generate_with_and_without_cache():
    model = tiny_model("mac", mac_attention="sliding")
    ids = _prompt(2 * WINDOW + 3, seed=4)
    kwargs = dict(max_new_tokens=3 * WINDOW, do_sample=False, min_new_tokens=3 * WINDOW)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_one_token_steps_of_a_left_padded_batch(impl):
    """Decoding steps skip the attention mask once every cached key is a real token; while left padding is still
    inside the window they must keep it. Row 0 has 6 padding slots (window 8), row 1 none."""
    model = tiny_model("mag", attn_implementation=impl)
    ids = torch.randint(2, 64, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :7], attention_mask=mask[:, :7], past_key_values=TitansCache(model.config), use_cache=True)
        for t in range(7, 30):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values,
                        use_cache=True)
            assert (out.logits[:, -1] - full[:, t]).abs().max() <= 1e-4, t


@pytest.mark.parametrize("prompt_len", [1, WINDOW, 4 * WINDOW + 3])
def test_greedy_generate_with_and_without_cache(variant, prompt_len):
    model = tiny_model(variant)
    ids = _prompt(prompt_len, seed=prompt_len)
    # 40 new tokens: 5 windows (MAC segments) and 10 memory chunks past the prompt. The uncached run re-reads the whole
    # sequence per token, so its cost grows with the square of this (64 took twice as long)
    kwargs = dict(max_new_tokens=40, do_sample=False, min_new_tokens=40)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape[1] == prompt_len + 40
    assert torch.equal(cached, uncached)



def test_generate_under_inference_mode(variant):
    """`torch.inference_mode()` (faster eager decoding, README) gives the same tokens as generate()'s own no_grad, and
    its cache (inference tensors) continues the stream outside inference mode."""
    model = tiny_model(variant)
    ids = _prompt(WINDOW + 3, seed=2)
    kwargs = dict(max_new_tokens=2 * WINDOW, do_sample=False, min_new_tokens=2 * WINDOW, return_dict_in_generate=True)
    want = model.generate(ids, **kwargs)
    want_more = model.generate(want.sequences, past_key_values=want.past_key_values, **kwargs)
    with torch.inference_mode():
        got = model.generate(ids, **kwargs)
    more = model.generate(got.sequences, past_key_values=got.past_key_values, **kwargs)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(more.sequences, want_more.sequences)

def test_left_padded_batch_generates_like_each_prompt_alone(variant):
    model = tiny_model(variant)
    prompts = [_prompt(n, seed=n) for n in (13, 6, 9)]
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :], mask[row, width - p.shape[1] :] = p[0], 1
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate(p, **kwargs)
        assert torch.equal(batched[row, width:], alone[0, p.shape[1] :]), row


def test_beam_search_with_and_without_cache(variant):
    model = tiny_model(variant)
    ids = _prompt(11)
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_sampling_streaming_and_chunked_prefill(variant):
    model = tiny_model(variant)
    ids = _prompt(4 * WINDOW + 3)
    torch.manual_seed(0)
    sampled = model.generate(ids, do_sample=True, top_k=10, max_new_tokens=12, num_return_sequences=2)
    assert sampled.shape == (2, ids.shape[1] + 12)
    reference = model.generate(ids, do_sample=False, max_new_tokens=20, min_new_tokens=20)
    chunked = model.generate(ids, do_sample=False, max_new_tokens=20, min_new_tokens=20, prefill_chunk_size=7)
    assert torch.equal(reference, chunked)


def test_text_streamer_streams(capsys):
    from transformers import AutoTokenizer

    tokenizer_dir = ROOT if os.path.exists(os.path.join(ROOT, "tokenizer.json")) else None
    if tokenizer_dir is None:
        pytest.skip("repository tokenizer not built")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model("mag", vocab_size=len(tokenizer))
    inputs = tokenizer("def main():", return_tensors="pt")
    streamer = TextStreamer(tokenizer)
    out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed.strip() and printed.strip() == tokenizer.decode(out[0]).strip()


def test_continuation_from_returned_cache_and_from_snapshot(variant, tmp_path):
    model = tiny_model(variant)
    ids = _prompt(4 * WINDOW + 3)
    kwargs = dict(do_sample=False)
    one_call = model.generate(ids, max_new_tokens=40, min_new_tokens=40, **kwargs)

    first = model.generate(ids, max_new_tokens=15, min_new_tokens=15, return_dict_in_generate=True, **kwargs)
    cache = first.past_key_values
    assert isinstance(cache, TitansCache) and cache.get_seq_length() == ids.shape[1] + 14
    cache.save_snapshot(str(tmp_path / "memory.safetensors"))
    continued = model.generate(first.sequences, past_key_values=cache, max_new_tokens=25, min_new_tokens=25, **kwargs)
    assert torch.equal(continued, one_call)

    loaded = TitansCache.from_snapshot(str(tmp_path / "memory.safetensors"), model.config)
    assert loaded.get_seq_length() == ids.shape[1] + 14
    again = model.generate(first.sequences, past_key_values=loaded, max_new_tokens=25, min_new_tokens=25, **kwargs)
    assert torch.equal(again, one_call)


def test_cache_size_is_bounded(variant):
    """Total cache bytes after 4,096 tokens equal those after 512: nothing in the state grows with the stream."""
    model = tiny_model(variant, scale=0.1)
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    out = model.generate(torch.randint(2, 64, (1, 500), generator=gen), **kwargs)
    cache = out.past_key_values
    assert cache.get_seq_length() == 511  # the last generated token is not fed back yet
    size_512 = cache.nbytes()
    sequence = out.sequences
    with torch.no_grad():  # stream up to 4,084 tokens through the same cache, then generate again
        while sequence.shape[1] < 4084:
            fresh = torch.randint(2, 64, (1, 512), generator=gen)
            model(sequence[:, cache.get_seq_length() :], past_key_values=cache, use_cache=True)
            sequence = torch.cat([sequence, fresh], dim=1)[:, :4084]
    out = model.generate(sequence, past_key_values=cache, **kwargs)
    assert out.sequences.shape[1] == 4096
    assert cache.nbytes() == size_512 > 0


def test_generate_builds_a_titans_cache_and_refuses_foreign_ones():
    model = tiny_model("mag")
    ids = _prompt(5)
    out = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, TitansCache)
    foreign = DynamicCache()
    foreign.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(TypeError, match="TitansCache"):
        model.generate(ids, max_new_tokens=3, past_key_values=foreign)
    with pytest.raises(TypeError, match="TitansCache"):
        model(ids, past_key_values=foreign)


def test_assisted_decoding_is_refused():
    model = tiny_model("mag")
    with pytest.raises(ValueError, match="stateful"):
        model.generate(_prompt(5), max_new_tokens=3, assistant_model=tiny_model("mag", seed=1))


def test_cache_from_another_config_or_batch_is_rejected(tmp_path):
    model = tiny_model("mag")
    other = tiny_model("mag", num_hidden_layers=3)
    cache = TitansCache(other.config)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        model(_prompt(3), past_key_values=cache)
    cache = TitansCache(model.config)
    model(_prompt(3), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="num_hidden_layers"):  # checked once by `model`, still refused by `other`
        other(_prompt(1), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.cat([_prompt(1), _prompt(1)]), past_key_values=cache, use_cache=True)
    cache.save_snapshot(str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        TitansCache.from_snapshot(str(tmp_path / "m.safetensors"), other.config)
    wide = tiny_model("mag", memory_head_dim=16)
    with pytest.raises(ValueError, match="memory_head_dim"):
        TitansCache.from_snapshot(str(tmp_path / "m.safetensors"), wide.config)


@pytest.mark.parametrize("variant", ["mag", "mac", "mal"])
def test_cache_in_another_dtype_is_rejected(variant):
    """A cache filled in one dtype and continued in another would join keys of two dtypes: promoted, they failed in
    the attention kernel (float32 cache, bfloat16 model) or silently turned the cache's dtype. Refused by name, and
    continuing in the dtype that filled the cache still works."""
    model = tiny_model(variant)
    half = tiny_model(variant).to(torch.bfloat16)
    for filler, other in ((model, half), (half, model)):
        with torch.no_grad():
            cache = filler(_prompt(9), use_cache=True).past_key_values
            want = f"holds attention keys in {filler.dtype}, but layer 0 now computes them in {other.dtype}"
            with pytest.raises(ValueError, match=re.escape(want)):
                other(_prompt(1), past_key_values=cache, use_cache=True)
            assert filler(_prompt(1), past_key_values=cache, use_cache=True).logits.isfinite().all()


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_persistent_kv_are_kept_in_inference_only(variant):
    model = tiny_model(variant)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        out = model(_prompt(5), use_cache=True)
        p = attn.persistent_tokens
        projections = (attn.k_proj, attn.v_proj)
        expected = [proj(p).view(len(p), -1, attn.head_dim).transpose(0, 1)[None] for proj in projections]
    cache = out.past_key_values
    kept = cache.layers[0].persistent_kv
    assert kept is not None and all(torch.equal(a, b) for a, b in zip(kept, expected))
    # continued under autograd, the persistent tokens get their gradient through fresh K/V, and nothing is kept
    model.zero_grad()
    model(_prompt(3, seed=1), past_key_values=cache, use_cache=True).logits.sum().backward()
    assert attn.persistent_tokens.grad is not None and attn.persistent_tokens.grad.abs().sum() > 0
    fresh = model(_prompt(3), use_cache=True).past_key_values
    assert all(layer.persistent_kv is None for layer in fresh.layers)
    cache.reset()
    assert all(layer.persistent_kv is None for layer in cache.layers)


def test_cache_is_not_croppable():
    cache = TitansCache(tiny_model("mag").config)
    assert not cache.is_croppable and not cache.is_compileable
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_stream_stays_finite_and_bounded(variant, dtype):
    model = tiny_model(variant, scale=0.1, attention_window=64, memory_chunk_size=16).to(dtype)
    cache = TitansCache(model.config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(40):  # 40 x 512 = 20,480 tokens
            out = model(torch.randint(2, 64, (1, 512), generator=gen), past_key_values=cache, use_cache=True)
            assert torch.isfinite(out.logits.float()).all()
    assert cache.get_seq_length() == 20480
    for layer in cache.layers:
        for w in layer.memory.weights:
            assert w.dtype == torch.float32  # inner state in fp32 even for a bf16 model
            assert torch.isfinite(w).all() and w.norm() < 100


def test_generate_from_inputs_embeds_matches_input_ids():
    model = tiny_model("mac")
    ids = _prompt(13)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    from_ids = model.generate(ids, **kwargs)[:, ids.shape[1] :]
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **kwargs)
    assert torch.equal(from_ids, from_embeds)


def test_batch_select_and_repeat_cover_the_whole_state(variant):
    """batch_select_indices / batch_repeat_interleave move every tensor of the state, memory included."""
    model = tiny_model(variant)
    a, b = _prompt(4 * WINDOW + 3, seed=1), _prompt(4 * WINDOW + 3, seed=2)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():  # as with any HF cache, the cache holds all but the last token given to generate()
        cache = TitansCache(model.config)
        model(torch.cat([a, b])[:, :-1], past_key_values=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([1]))
        assert torch.equal(model.generate(b, past_key_values=cache, **kwargs), model.generate(b, **kwargs))
        cache = TitansCache(model.config)
        model(a[:, :-1], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(2)
        both = model.generate(torch.cat([a, a]), past_key_values=cache, **kwargs)
    alone = model.generate(a, **kwargs)
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1], alone[0])
