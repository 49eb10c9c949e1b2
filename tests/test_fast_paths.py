"""Fast paths against the reference path: bf16 model vs fp32, training (stateless) vs streaming memory."""

import pytest
import torch
from conftest import tiny_model

from modeling_titans import TitansCache


def test_bf16_model_tracks_fp32_and_keeps_fp32_memory_state(variant):
    model = tiny_model(variant, scale=0.1)
    ids = torch.randint(2, 64, (2, 40))
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
            assert all(w.dtype == torch.float32 for w in layer.memory.weights + layer.memory.momentum)


def test_training_path_equals_streaming_path(variant):
    """The stateless chunk-parallel path used in training and the stateful path used with a cache agree."""
    model = tiny_model(variant)
    ids = torch.randint(2, 64, (3, 45))
    with torch.no_grad():
        training = model(ids, use_cache=False).logits
        streaming = model(ids, past_key_values=TitansCache(model.config), use_cache=True).logits
    torch.testing.assert_close(training, streaming, atol=1e-5, rtol=0)


def _compiled_matches_eager(variant, backend):
    model = tiny_model(variant).train()
    ids = torch.randint(2, 64, (2, 32))
    eager = model(ids, labels=ids)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend=backend)(ids, labels=ids)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=0)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_torch_compile_training_step_matches_eager(variant):
    """Dynamo + AOTAutograd trace the memory (including the recomputing backward of `_MemoryScanFunction`)."""
    torch._dynamo.reset()
    _compiled_matches_eager(variant, "aot_eager")


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    """Generated kernels (stated tolerance 1e-4 on logits, gradients 1e-4 + 0.1 %)."""
    torch._dynamo.reset()
    _compiled_matches_eager("mag", "inductor")
