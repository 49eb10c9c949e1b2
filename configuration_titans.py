# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Titans model configuration (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663)."""

from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)


VARIANTS = ("mac", "mag", "mal", "lmm")
MEMORY_ACTIVATIONS = ("silu", "gelu", "tanh")


class TitansConfig(PreTrainedConfig):
    r"""
    Configuration of a Titans causal language model. Every size the paper varies is a field here.

    Args:
        variant (`str`, defaults to `"mag"`):
            How the neural long-term memory is wired to attention (paper §4): `"mac"` memory as a context,
            `"mag"` memory as a gate, `"mal"` memory as a layer, `"lmm"` memory only (no attention).
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        head_dim, rope_theta, rms_norm_eps, tie_word_embeddings: the usual Llama-style sizes. RoPE is the default
            one with base `rope_theta`; `rope_scaling` / `rope_parameters` of another type are refused (the attention
            never spans more than `attention_window` tokens, at any length).
        attention_window (`int`, defaults to 64):
            Sliding-window size of the attention (MAG, MAL and layers without memory) and segment length C of
            MAC (paper Eq. 21). A query sees at most `attention_window` tokens, itself included.
        num_persistent_tokens (`int`, defaults to 4):
            N_p learnable, input-independent tokens prepended to every attention's keys (paper §3.3, Eq. 19).
        num_memory_tokens (`int`, *optional*):
            MAC only: how many of the most recent per-token retrievals h_t (paper Eq. 21) each query attends to,
            within its segment. `None` means the whole segment (N_l = C).
        mac_attention (`str`, defaults to `"segment"`):
            MAC only: the reach of the attention over [persistent | h | x]. `"segment"` is the paper's (Eq. 21-23):
            causal inside each segment of `attention_window` tokens, so a segment's first token sees only itself.
            `"sliding"` is a sliding window of `attention_window` tokens over the same keys, across segment starts;
            the memory is still read and written segment by segment. With `"segment"` MAC did not learn our
            passkey task, with `"sliding"` it did (model card D20).
        memory_layers (`list[int]`, *optional*):
            Indices of the decoder layers that carry a neural memory; `None` means all. Layers without memory
            are sliding-window attention layers (the "memory disabled" baseline is `memory_layers=[]`).
        memory_depth (`int`, defaults to 2): L_M, the number of layers of the memory MLP (1 = linear memory).
        memory_expansion (`int`, defaults to 2): hidden width of a deep memory, as a multiple of `memory_head_dim`.
        num_memory_heads (`int`, defaults to 4): independent memories per layer.
        memory_head_dim (`int`, defaults to 64): key/value width of each memory.
        memory_chunk_size (`int`, defaults to 16):
            b, the chunk of the chunk-parallel training (paper §3.2): gradients inside a chunk are taken at the
            chunk-start weights. For MAC it must divide `attention_window`.
        memory_conv_size (`int`, defaults to 4): kernel of the depthwise causal convolution after q/k/v (§4.4);
            0 disables it.
        memory_max_lr (`float`, defaults to 0.02): upper bound of the inner learning rate θ_t. Inside a chunk the
            gradient is stale (taken at the chunk start), so one chunk is a gradient step of size Σθ ≤
            memory_max_lr · memory_chunk_size on a loss of curvature ≈ 2 (unit keys): keep that product ≤ 1
            (a warning says so). θ_t is scaled by (1 - η_t), so momentum cannot amplify it (model card D18).
        memory_activation (`str`, defaults to `"silu"`): non-linearity between the layers of a deep memory.
        memory_use_momentum (`bool`): ablation switch; `False` fixes η_t = 0 (paper Tab. 5 "w/o momentum").
        memory_use_forgetting (`bool`): ablation switch; `False` fixes α_t = 0 (paper Tab. 5 "w/o weight decay").
        memory_value_norm (`bool`, defaults to `True`): ℓ2-normalise the memory values as well as q and k
            (the paper normalises q and k only); keeps the inner loss bounded over unbounded streams.
    """

    model_type = "titans"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    attention_bias: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    variant: str = "mag"
    attention_window: int = 64
    num_persistent_tokens: int = 4
    num_memory_tokens: int | None = None
    mac_attention: str = "segment"
    memory_layers: list[int] | None = None
    memory_depth: int = 2
    memory_expansion: int = 2
    num_memory_heads: int = 4
    memory_head_dim: int = 64
    memory_chunk_size: int = 16
    memory_conv_size: int = 4
    memory_max_lr: float = 0.02
    memory_activation: str = "silu"
    memory_use_momentum: bool = True
    memory_use_forgetting: bool = True
    memory_value_norm: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.memory_layers is None:
            self.memory_layers = list(range(self.num_hidden_layers))
        else:
            self.memory_layers = sorted(int(i) for i in self.memory_layers)
        self.validate_titans()
        self.validate_rope(kwargs.get("rope_parameters") or kwargs.get("rope_scaling"))
        super().__post_init__(**kwargs)

    def validate_rope(self, rope: dict | None):
        """Llama-style `rope_parameters` / `rope_scaling` are accepted only where they say what `rope_theta` says: the
        model builds the default RoPE from `rope_theta` and would otherwise ignore them silently."""
        if rope is None:
            return
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"TitansConfig: RoPE scaling (rope_type={rope_type!r}) is not supported. Attention spans at most "
                "attention_window tokens, so the rotary distances stay within those seen in training at any length."
            )
        theta = rope.get("rope_theta")
        if theta is not None and theta != self.rope_theta:
            raise ValueError(
                f"TitansConfig: rope_parameters gives rope_theta={theta!r} but rope_theta is {self.rope_theta!r}; "
                f"Titans reads rope_theta: pass rope_theta={theta!r}."
            )

    def validate_titans(self):
        """Raise a `ValueError` naming the field and the allowed values for every invalid setting."""

        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TitansConfig.{name} must be a positive integer, got {value!r}.")

        if self.variant not in VARIANTS:
            raise ValueError(f"TitansConfig.variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.memory_activation not in MEMORY_ACTIVATIONS:
            raise ValueError(
                f"TitansConfig.memory_activation must be one of {MEMORY_ACTIVATIONS}, got {self.memory_activation!r}."
            )
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "attention_window", "memory_depth", "memory_expansion",
            "num_memory_heads", "memory_head_dim", "memory_chunk_size",
        ):
            positive(name)
        for name in ("num_persistent_tokens", "memory_conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TitansConfig.{name} must be a non-negative integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"TitansConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if not (isinstance(self.memory_max_lr, (int, float)) and self.memory_max_lr > 0):
            raise ValueError(f"TitansConfig.memory_max_lr must be a positive number, got {self.memory_max_lr!r}.")
        if self.memory_max_lr * self.memory_chunk_size > 1:
            logger.warning(
                f"TitansConfig: memory_max_lr * memory_chunk_size = {self.memory_max_lr * self.memory_chunk_size:g} "
                "> 1. Inside a chunk all gradients are taken at the chunk-start weights, so one chunk is a step of "
                "up to that size on a loss of curvature ~2; the memory may diverge. Lower memory_max_lr."
            )
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"TitansConfig.rope_theta must be a positive number, got {self.rope_theta!r}.")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"TitansConfig.rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}.")
        bad = [i for i in self.memory_layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.memory_layers)) != len(self.memory_layers):
            raise ValueError(
                f"TitansConfig.memory_layers must hold distinct layer indices in [0, {self.num_hidden_layers}), "
                f"got {self.memory_layers!r}."
            )
        if self.variant == "mac" and self.attention_window % self.memory_chunk_size != 0:
            raise ValueError(
                f"TitansConfig.memory_chunk_size ({self.memory_chunk_size}) must divide attention_window "
                f"({self.attention_window}) for variant='mac': the memory state that a segment retrieves from "
                "(paper Eq. 21) must sit on a chunk boundary."
            )
        if self.num_memory_tokens is not None:
            if self.variant != "mac":
                raise ValueError("TitansConfig.num_memory_tokens is only used by variant='mac'; leave it None.")
            if not (isinstance(self.num_memory_tokens, int) and 1 <= self.num_memory_tokens <= self.attention_window):
                raise ValueError(
                    f"TitansConfig.num_memory_tokens must be an integer in [1, attention_window="
                    f"{self.attention_window}] or None, got {self.num_memory_tokens!r}."
                )
        if self.mac_attention not in ("segment", "sliding"):
            raise ValueError(
                f"TitansConfig.mac_attention must be 'segment' or 'sliding', got {self.mac_attention!r}."
            )
        if self.mac_attention != "segment" and self.variant != "mac":
            raise ValueError("TitansConfig.mac_attention is only used by variant='mac'; leave it 'segment'.")
        if self.variant == "lmm" and len(self.memory_layers) == 0:
            raise ValueError("TitansConfig.memory_layers must not be empty for variant='lmm' (memory-only model).")

    @property
    def memory_hidden_dim(self) -> int:
        return self.memory_expansion * self.memory_head_dim


__all__ = ["TitansConfig"]
