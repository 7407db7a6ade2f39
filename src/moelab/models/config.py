"""MoETransformerConfig: one validated dataclass describing a whole MoE (or dense) transformer.

Layer placement follows GShard (Lepikhin et al. 2020, MoE in every other layer) and
DeepSeekMoE (Dai et al. 2024, the first k layers dense): layer i (0-based) is an MoE layer iff
``moe is not None and i >= first_k_dense and (i + 1) % moe_every == 0`` -- the same rule as
transformers' Qwen2-MoE (``decoder_sparse_step``, ``mlp_only_layers``) and Llama-4
(``interleave_moe_layer_step``). ``dense_baseline`` returns the dense model with the same active
FFN FLOPs per token (Artetxe et al. 2021, "Efficient Large Scale Language Modeling with MoEs").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from moelab.errors import ConfigError
from moelab.layers.config import MoEConfig

MODES = ("causal", "mlm")
DENSE_ACTS = ("swiglu", "gelu", "relu")
# keys save() adds to config.json beside the fields; from_dict() accepts and drops them
META_KEYS = ("model_type", "moelab_version")


@dataclass
class MoETransformerConfig:
    """Architecture + loss coefficients of a MoETransformer. Defaults run on a laptop CPU."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    d_ff: int = 512  # hidden size of the dense FFN (dense layers and dense models)
    max_seq_len: int = 256
    mode: str = "causal"  # "causal" LM (decoder) or "mlm" (bidirectional encoder)
    moe: MoEConfig | None = None  # None = dense model
    moe_every: int = 1
    first_k_dense: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    pad_token_id: int | None = 0
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    dense_act: str = "swiglu"  # activation of the dense FFN layers
    init_std: float = 0.02  # std of the normal init (nanoGPT/GPT-2 style)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field, its value and what is allowed."""

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                value = getattr(self, name.split(".")[0])
                if name.startswith("moe."):
                    value = getattr(self.moe, name[4:])
                raise ConfigError(f"MoETransformerConfig.{name}={value!r}: {msg}")

        def pos_int(name: str) -> None:
            v = getattr(self, name)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                name,
                "must be a positive int",
            )

        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "max_seq_len",
        ):
            pos_int(name)
        need(
            self.d_model % self.n_heads == 0,
            "d_model",
            f"must be divisible by n_heads={self.n_heads}",
        )
        need(
            (self.d_model // self.n_heads) % 2 == 0,
            "n_heads",
            f"head_dim = d_model/n_heads = {self.d_model // self.n_heads} must be even for rotary embeddings",
        )
        need(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"must divide n_heads={self.n_heads} (grouped-query attention)",
        )
        need(self.mode in MODES, "mode", f"must be one of {MODES}")
        need(self.dense_act in DENSE_ACTS, "dense_act", f"must be one of {DENSE_ACTS}")
        pos_int("moe_every")
        need(
            isinstance(self.first_k_dense, int) and 0 <= self.first_k_dense < self.n_layers,
            "first_k_dense",
            f"must be an int in [0, n_layers={self.n_layers})",
        )
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0")
        need(self.z_loss_coef >= 0, "z_loss_coef", "must be >= 0")
        need(self.init_std > 0, "init_std", "must be > 0")
        for name in ("pad_token_id", "mask_token_id", "bos_token_id"):
            v = getattr(self, name)
            need(
                v is None or (isinstance(v, int) and 0 <= v < self.vocab_size),
                name,
                f"must be None or a token id in [0, vocab_size={self.vocab_size})",
            )
        if self.moe is not None:
            need(isinstance(self.moe, MoEConfig), "moe", "must be a MoEConfig, a dict or None")
            need(
                self.moe.d_model == self.d_model,
                "moe.d_model",
                f"must equal d_model={self.d_model}",
            )
            if self.moe.router == "hash":
                need(
                    self.moe.vocab_size == self.vocab_size,
                    "moe.vocab_size",
                    f"hash routing needs moe.vocab_size == vocab_size={self.vocab_size}",
                )
            need(
                len(self.moe_layer_indices()) > 0,
                "moe_every",
                f"places no MoE layer in {self.n_layers} layers with first_k_dense={self.first_k_dense}",
            )

    @property
    def head_dim(self) -> int:
        """d_model / n_heads."""
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """True if transformer layer i (0-based) has an MoE FFN."""
        return self.moe is not None and i >= self.first_k_dense and (i + 1) % self.moe_every == 0

    def moe_layer_indices(self) -> list[int]:
        """Indices of the MoE layers."""
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (moe nested as a dict or None)."""
        d = asdict(self)
        d["moe"] = self.moe.to_dict() if self.moe is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoETransformerConfig:
        """Build from a dict (as written by to_dict/save), rejecting unknown keys."""
        d = {k: v for k, v in d.items() if k not in META_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(
                f"MoETransformerConfig: unknown keys {sorted(unknown)}; known: {sorted(known)}"
            )
        moe = d.get("moe")
        if isinstance(moe, dict):
            d = {**d, "moe": MoEConfig.from_dict(moe)}
        return cls(**d)


def dense_baseline(cfg: MoETransformerConfig) -> MoETransformerConfig:
    """Dense config with the same active FFN FLOPs per token: d_ff = k * expert d_ff + shared hidden.

    Router FLOPs (2*d_model*E per MoE layer) are the only difference left. With dense layers
    between MoE layers (moe_every > 1 or first_k_dense > 0) the dense d_ff must already equal the
    active MoE hidden size, otherwise no single dense d_ff matches layer by layer.
    """
    if cfg.moe is None:
        return replace(cfg)
    m = cfg.moe
    active = m.top_k * m.d_ff + m.shared_hidden
    n_dense_layers = cfg.n_layers - len(cfg.moe_layer_indices())
    if n_dense_layers > 0 and (cfg.d_ff != active or cfg.dense_act != m.expert_act):
        raise ConfigError(
            f"dense_baseline: the model has {n_dense_layers} dense layers with d_ff={cfg.d_ff} "
            f"({cfg.dense_act}) but MoE layers with active hidden {active} ({m.expert_act}); "
            "a single dense d_ff cannot match both -- set d_ff to the active hidden size"
        )
    return replace(cfg, moe=None, moe_every=1, first_k_dense=0, d_ff=active, dense_act=m.expert_act)
