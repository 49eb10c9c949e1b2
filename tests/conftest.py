import os
import sys


# Before torch is imported: OpenMP threads that busy-wait made steps 10-50x slower on a loaded 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


# Triton (optional) picks compiled or interpreted kernels when it is imported: without a GPU, interpret them
# (numpy-backed) so that tests/test_triton_scan.py runs the fused memory scan here. Nothing else uses triton on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configuration_titans import TitansConfig  # noqa: E402
from modeling_titans import TitansForCausalLM  # noqa: E402


VARIANTS = ("mac", "mag", "mal", "lmm")

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    attention_window=8,
    num_persistent_tokens=2,
    num_memory_heads=2,
    memory_head_dim=8,
    memory_chunk_size=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
)


def tiny_config(variant="mag", **overrides) -> TitansConfig:
    return TitansConfig(**{**TINY, "variant": variant, **overrides})


def randomize(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move every learned parameter away from its (often zero or one) initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def tiny_model(variant="mag", seed=0, random_params=True, scale=0.3, **overrides) -> TitansForCausalLM:
    torch.manual_seed(seed)
    model = TitansForCausalLM(tiny_config(variant, **overrides)).eval()
    return randomize(model, scale=scale, seed=seed) if random_params else model


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


def assert_reloaded_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """A reloaded model computes what the saved one did: the same greedy choice everywhere, logits within fp32 noise.
    Not bitwise: safetensors memory-maps the weights at other byte offsets, and MKL on AVX-512 CPUs picks kernels
    by alignment (seen: 5.4e-6 on an AMD EPYC with equal weights; bit-identical on the earlier Intel machines)."""
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
