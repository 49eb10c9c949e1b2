"""The same guarantees on a CUDA device: chunked memory vs the token recurrence, CUDA vs CPU, cached vs uncached
generation, padded vs unpadded, attention backends, bf16 (autocast and bf16 weights), compiled training steps and
compiled decoding steps.

Skipped where there is no GPU (CI). Run on a GPU machine with `python -m pytest tests/test_gpu.py -m "slow or not slow"`.
"""

import os

import pytest
import torch
from conftest import tiny_model
from reference import reference_memory
from test_fast_paths import (
    check_autocast_leaves_the_memory_in_fp32,
    check_bf16_model_tracks_fp32,
    check_compiled_decode_step_matches_eager,
)
from test_memory import _random_problem, _scan

from modeling_titans import TitansCache


# TITANS_TEST_GPU_DEVICE=cpu dry-runs this file's logic without a GPU
CUDA = os.environ.get("TITANS_TEST_GPU_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(CUDA == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    # fp32 comparisons need fp32 matmuls, not TF32
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _to(tensors, device):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [4, 16])
def test_chunk_scan_on_cuda_equals_token_recurrence(depth, chunk):
    weights, q, k, v, lr, eta, alpha = _random_problem(depth, 32, seed=depth * 7 + chunk)
    out, w_end, _ = _scan(_to(weights, CUDA), *_to((q, k, v, lr, eta, alpha), CUDA), chunk)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref_out, ref_w, _ = reference_memory(
                [w[b, h] for w in weights], q[b, h], k[b, h], v[b, h], lr[b, h], eta[b, h], alpha[b, h], chunk
            )
            torch.testing.assert_close(out[b, h].cpu(), ref_out, atol=1e-6, rtol=0)
            for got, want in zip(w_end, ref_w):
                torch.testing.assert_close(got[b, h].cpu(), want, atol=1e-6, rtol=0)


def _loss_and_grads(model, ids, **kwargs):
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = [p.grad.detach().cpu().clone() for p in model.parameters()]
    model.zero_grad()
    return out.logits.detach().cpu(), grads


def test_cuda_training_step_matches_cpu(variant):
    model = tiny_model(variant, scale=0.1).train()
    ids = torch.randint(2, 64, (2, 45), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cpu = _loss_and_grads(model, ids, attention_mask=mask)
    gpu = _loss_and_grads(model.to(CUDA), ids.to(CUDA), attention_mask=mask.to(CUDA))
    torch.testing.assert_close(gpu[0], cpu[0], atol=1e-4, rtol=0)
    for g, c in zip(gpu[1], cpu[1]):
        torch.testing.assert_close(g, c, atol=1e-4, rtol=1e-3)


def test_cuda_activation_checkpointing_with_offload_gives_the_same_gradients():
    """`activation_checkpointing_enable(offload=True)` keeps the saved inputs in pinned host memory (Transformers 5.23;
    on a CPU-only machine it refuses to pin): the same loss and gradients as without checkpointing."""
    if not torch.cuda.is_available():
        pytest.skip("pinned host memory needs an accelerator (dry run on the CPU)")
    ids = torch.randint(2, 64, (2, 45), generator=torch.Generator().manual_seed(1)).to(CUDA)
    model = tiny_model("mac", scale=0.1).train().to(CUDA)
    plain = _loss_and_grads(model, ids)
    model.activation_checkpointing_enable(offload=True)
    offloaded = _loss_and_grads(model, ids)
    torch.testing.assert_close(offloaded[0], plain[0], atol=1e-6, rtol=0)
    for g, c in zip(offloaded[1], plain[1]):
        torch.testing.assert_close(g, c, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prompt_len", [3, 35])
def test_cuda_greedy_generate_with_and_without_cache(variant, prompt_len):
    model = tiny_model(variant).to(CUDA)
    ids = torch.randint(2, 64, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len)).to(CUDA)
    kwargs = dict(max_new_tokens=48, min_new_tokens=48, do_sample=False)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_cuda_left_padded_batch_generates_like_each_prompt_alone(variant):
    model = tiny_model(variant).to(CUDA)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(2, 64, (1, 13), generator=gen), torch.randint(2, 64, (1, 6), generator=gen)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], dim=1)]).to(CUDA)
    mask = (torch.arange(13)[None] >= torch.tensor([[0], [7]])).long().to(CUDA)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    for row, single in enumerate((a, b)):
        alone = model.generate(single.to(CUDA), **kwargs)
        assert torch.equal(batch[row, -24:], alone[0, -24:]), row


@pytest.mark.parametrize("impl", ["sdpa", "flex_attention"])
def test_cuda_attention_backends_match_eager(variant, impl):
    if variant == "lmm":
        pytest.skip("memory-only: no attention")
    model = tiny_model(variant, scale=0.1).to(CUDA)
    ids = torch.randint(2, 64, (2, 40), generator=torch.Generator().manual_seed(1)).to(CUDA)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(impl)
        other = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(other[mask.bool()], eager[mask.bool()], atol=1e-5, rtol=0)


def test_cuda_flex_over_several_blocks_matches_eager_with_gradients(variant):
    """flex attention with `titans_block_mask` over several 128-token blocks (left padding of 140 in one row) against
    eager attention, outputs and parameter gradients (flex has no backward on CPU, so only the GPU checks them)."""
    if variant == "lmm":
        pytest.skip("memory-only: no attention")
    if torch.device(CUDA).type == "cpu":
        pytest.skip("flex attention has no backward on CPU (dry run)")
    model = tiny_model(variant, scale=0.1).to(CUDA).train()
    ids = torch.randint(2, 64, (2, 300), generator=torch.Generator().manual_seed(2)).to(CUDA)
    mask = torch.ones_like(ids)
    mask[1, :140] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for impl in ("eager", "flex_attention"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results[impl] = (out.logits.detach()[mask.bool()], [p.grad.clone() for p in model.parameters()])
    (eager, eager_grads), (flex, flex_grads) = results["eager"], results["flex_attention"]
    torch.testing.assert_close(flex, eager, atol=1e-5, rtol=0)
    for a, b in zip(flex_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item() + 1e-8, rtol=1e-4)


def test_cuda_autocast_keeps_the_memory_fp32(variant):
    """bf16 autocast on CUDA: the memory scan is bit-identical to fp32 (D16), the model tracks fp32."""
    check_autocast_leaves_the_memory_in_fp32(variant, CUDA)


def test_cuda_bf16_weights_keep_an_fp32_memory_state(variant):
    check_bf16_model_tracks_fp32(variant, CUDA)


def test_cuda_anchor_sized_training_path_equals_streaming_path(variant):
    """Anchor-sized memory (64-dim heads, chunk 64) over several chunks: the parallel training path and the
    stateful cache path agree on the GPU too."""
    model = tiny_model(variant, scale=0.05, hidden_size=128, num_attention_heads=2, memory_head_dim=64,
                       num_memory_heads=2, memory_chunk_size=64, attention_window=64).to(CUDA)  # fmt: skip
    ids = torch.randint(2, 64, (2, 300), generator=torch.Generator().manual_seed(5)).to(CUDA)
    with torch.no_grad():
        training = model(ids, use_cache=False).logits
        streaming = model(ids, past_key_values=TitansCache(model.config), use_cache=True).logits
    torch.testing.assert_close(training, streaming, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_cuda_inductor_training_step_matches_eager(variant):
    """Generated Triton kernels (stated tolerance 1e-4 on logits, gradients 1e-4 + 0.1 %)."""
    torch._dynamo.reset()
    model = tiny_model(variant).train().to(CUDA)
    ids = torch.randint(2, 64, (2, 32), generator=torch.Generator().manual_seed(6)).to(CUDA)
    eager = _loss_and_grads(model, ids)
    compiled = _loss_and_grads(torch.compile(model), ids)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-4, rtol=0)
    for c, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_cuda_graphs_training_steps_match_eager():
    """torch.compile(model, mode="reduce-overhead", fullgraph=True): MAG's step as one graph replayed as CUDA graphs
    (the fused memory kernels launched inside the captured scan operator). Three steps (warm-up, recording, replay),
    each against eager (stated tolerance as for inductor: 1e-4 on logits, gradients 1e-4 + 0.1 %)."""
    torch._dynamo.reset()
    model = tiny_model("mag").train().to(CUDA)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for step in range(3):
        ids = torch.randint(2, 64, (2, 32), generator=torch.Generator().manual_seed(step)).to(CUDA)
        eager = _loss_and_grads(model, ids)
        graphed = _loss_and_grads(compiled, ids)
        torch.testing.assert_close(graphed[0], eager[0], atol=1e-4, rtol=0)
        for c, e in zip(graphed[1], eager[1]):
            torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_cuda_compiled_decode_step_matches_eager(variant, monkeypatch):
    """TITANS_MEMORY_KERNEL=compile's decoding steps (per-layer memory step, then the whole step) as generated Triton
    kernels, against the eager steps."""
    check_compiled_decode_step_matches_eager(variant, monkeypatch, device=CUDA)


@pytest.mark.parametrize("variant", ["swa", "mag", "lmm"])
def test_cuda_training_step_launches_do_not_grow_with_the_length(variant, monkeypatch):
    """The CUDA kernels of one training step (torch.profiler) at 4x the length: as many, give or take a few that
    cuBLAS picks by size, with the CPU's pieces made small (`_PIECE_ELEMENTS`: they must stay CPU-only) and the fused
    memory scan (d, chunk 16). `scripts/count_ops.py` predicts the same from the meta device."""
    import modeling_titans
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if torch.device(CUDA).type != "cuda":
        pytest.skip("kernel launches are a CUDA property")
    monkeypatch.setattr(modeling_titans, "_PIECE_ELEMENTS", 2 * 16 * 32)  # on the CPU: pieces of 16 tokens
    overrides = dict(memory_head_dim=16, memory_chunk_size=16, attention_window=16)
    if variant == "swa":  # the memory-disabled model
        variant, overrides["memory_layers"] = "mag", []
    model = tiny_model(variant, **overrides).train().to(CUDA)

    def kernels(length):
        ids = torch.randint(2, 64, (2, length), generator=torch.Generator().manual_seed(0)).to(CUDA)
        model(ids, labels=ids).loss.backward()  # warm-up: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
        model.zero_grad()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)

    short, long = kernels(64), kernels(256)
    assert 0 < long <= 1.1 * short, (short, long)
