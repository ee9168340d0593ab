"""Model configuration: one typed dataclass and a table of named configs.

Every architecture lmstack runs is a point in this space; the model code branches on these fields and
never on a family name. No torch import here so the CLI can list models without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

Norm = Literal["layernorm", "rmsnorm"]
MLP = Literal["gelu", "relu", "swiglu", "geglu"]
Positions = Literal["learned", "sinusoidal", "rope", "none"]
LayerType = Literal["global", "local"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    family: str = "llama"  # provenance only (naming at the load boundary), never a code branch
    vocab_size: int = 32000
    dim: int = 512  # model width (C)
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None -> MHA; 1 -> MQA; otherwise GQA
    head_dim: int | None = None  # None -> dim // n_heads
    hidden_dim: int = 1376  # MLP inner width
    max_seq_len: int = 2048  # context window the model was trained for
    # normalization
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: scale by (1 + w) instead of w
    post_norms: bool = False  # Gemma 2/3 "sandwich": norm the block output before the residual add
    # feed-forward
    mlp: MLP = "swiglu"
    gelu_approx: Literal["none", "tanh"] = "tanh"
    mlp_bias: bool = False
    # attention
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Gemma 3, Qwen 3)
    attn_scale: float | None = None  # None -> head_dim ** -0.5
    attn_softcap: float | None = None  # tanh soft-capping of attention logits (Gemma 2)
    sliding_window: int | None = None  # window of "local" layers
    layer_types: tuple[LayerType, ...] | None = None  # per layer; None -> all global
    # positions
    positions: Positions = "rope"
    rope_base: float = 10000.0
    rope_local_base: float | None = None  # RoPE base of local layers (Gemma 3); None -> rope_base
    rope_scaling: float = 1.0  # linear position interpolation factor of global layers
    rotary_dim: int | None = None  # None -> full head_dim
    # embeddings and head
    tie_embeddings: bool = True
    embed_scale: float | None = None  # multiply token embeddings (Gemma: sqrt(dim))
    final_softcap: float | None = None  # tanh soft-capping of the output logits (Gemma 2)
    # tokenizer-facing facts that the generation path needs
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        problems = []
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0 or self.vocab_size <= 0:
            problems.append("dim, n_layers, n_heads and vocab_size must be positive")
        if self.head_dim is None and self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.n_heads % self.kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if self.layer_types and "local" in self.layer_types and not self.sliding_window:
            problems.append("local layers need sliding_window")
        if problems:
            raise ValueError(f"invalid ModelConfig {self.name!r}: " + "; ".join(problems))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def layer_type(self, i: int) -> LayerType:
        return self.layer_types[i] if self.layer_types else "global"

    def window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_type(i) == "local" else None

    def rope_base_for(self, i: int) -> float:
        if self.layer_type(i) == "local" and self.rope_local_base is not None:
            return self.rope_local_base
        return self.rope_base

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["layer_types"] is not None:
            d["layer_types"] = list(d["layer_types"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def gemma3_layer_types(n_layers: int, pattern: int = 6) -> tuple[LayerType, ...]:
    """Gemma 3 interleaves five sliding-window layers with one global layer."""
    return tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(n_layers))


NAMED_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            vocab_size=151936,
            dim=896,
            n_layers=24,
            n_heads=14,
            n_kv_heads=2,
            hidden_dim=4864,
            max_seq_len=32768,
            norm_eps=1e-6,
            qkv_bias=True,
            rope_base=1_000_000.0,
            tie_embeddings=True,
        ),
        ModelConfig(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            vocab_size=151936,
            dim=1536,
            n_layers=28,
            n_heads=12,
            n_kv_heads=2,
            hidden_dim=8960,
            max_seq_len=32768,
            norm_eps=1e-6,
            qkv_bias=True,
            rope_base=1_000_000.0,
            tie_embeddings=True,
        ),
        ModelConfig(
            name="smollm2-135m-instruct",
            family="llama",
            vocab_size=49152,
            dim=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            hidden_dim=1536,
            max_seq_len=8192,
            norm_eps=1e-5,
            rope_base=100000.0,
            tie_embeddings=True,
        ),
        ModelConfig(
            name="gemma-3-270m",
            family="gemma3",
            vocab_size=262144,
            dim=640,
            n_layers=18,
            n_heads=4,
            n_kv_heads=1,
            head_dim=256,
            hidden_dim=2048,
            max_seq_len=32768,
            norm_eps=1e-6,
            norm_unit_offset=True,
            post_norms=True,
            mlp="geglu",
            gelu_approx="tanh",
            qk_norm=True,
            attn_scale=256**-0.5,
            sliding_window=512,
            layer_types=gemma3_layer_types(18),
            rope_base=1_000_000.0,
            rope_local_base=10000.0,
            tie_embeddings=True,
            embed_scale=640**0.5,
        ),
        # tiny configs for tests and from-scratch pretraining smoke runs
        ModelConfig(
            name="gpt2-tiny",
            family="gpt2",
            vocab_size=512,
            dim=64,
            n_layers=2,
            n_heads=4,
            hidden_dim=256,
            max_seq_len=128,
            norm="layernorm",
            mlp="gelu",
            gelu_approx="tanh",
            positions="learned",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
        ),
        ModelConfig(
            name="llama-tiny",
            family="llama",
            vocab_size=512,
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            hidden_dim=176,
            max_seq_len=128,
            tie_embeddings=False,
        ),
    ]
}


def get_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown model config {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}"
        ) from None
