"""The model configuration every family parses its HF `config.json` into (models.families).

One frozen dataclass of shapes and flags: the families differ in flags (q/k/v bias, q/k
RMSNorm, tied embeddings, sliding windows, RoPE scaling, Gemma's norms, activation and
soft-caps), and `architecture` names the family (models.registry) whose declarations and block
build the model. The config is hashable so it can ride along as a static jit argument.
"""

from __future__ import annotations

import dataclasses

from ferrum_jax.interfaces.errors import FerrumError

ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is one of `default`, `linear`, `llama3`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: the sliding window size, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    # Gemma: the activation of the gated MLP ("silu" or "gelu_tanh"), RMSNorm as x * (1 + w),
    # the embedding scaled by sqrt(hidden).
    hidden_act: str = "silu"
    norm_unit_offset: bool = False
    embed_scale: bool = False
    # Attention's score scale (None: head_dim ** -0.5), tanh soft-caps of the attention scores and
    # of the final logits (None: off).
    query_scale: float | None = None
    attn_soft_cap: float | None = None
    final_soft_cap: float | None = None
    # The RoPE of sliding-window layers when it differs from `rope` (Gemma 3's local base).
    local_rope: RopeConfig | None = None
    # Mixture of experts (num_experts 0: every MLP dense): experts per MoE layer, experts each
    # token takes, their MLP width, whether the top-k weights are renormalized to sum to 1, and
    # whether they scale the experts' outputs in float32 (Mixtral) or in the model dtype (Qwen3-MoE).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_float32_weights: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise FerrumError.invalid_config(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise FerrumError.invalid_config(
                f"{len(self.sliding_windows)} layer attention types for {self.num_layers} layers"
            )
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise FerrumError.invalid_config(
                f"num_experts_per_tok={self.experts_per_token}: must be in [1, num_experts={self.num_experts}]"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise FerrumError.unsupported(f"hidden_act={self.hidden_act!r}: implemented are {list(ACTIVATIONS)}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def sm_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def layer_rope(self, layer: int) -> RopeConfig:
        """The RoPE of `layer`: `local_rope` on sliding-window layers where set, else `rope`."""
        if self.local_rope is not None and self.sliding_windows[layer] is not None:
            return self.local_rope
        return self.rope
