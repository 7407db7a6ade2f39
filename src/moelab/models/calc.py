"""Scaling calculator: total vs active parameters, FLOPs per token, weight memory per precision,
KV-cache bytes per token and how many KV tokens fit beside the weights in a given memory.

The memory trade-off is the one studied in "Toward Inference-optimal Mixture-of-Expert Large
Language Models" (Yun et al. 2024): more experts raise total parameters (weight memory) at the
same active compute, leaving less room for the KV cache and therefore for batch size.
Parameter counts follow each model's transformers implementation; FLOPs per token count 2 per
multiply-add (Kaplan et al. 2020) plus attention over `seq_len` positions (Hoffmann et al. 2022,
Appendix F). KV cache per token: 2 * n_kv_heads * head_dim per layer (GQA, Ainslie et al. 2023),
or kv_lora_rank + qk_rope_head_dim for DeepSeek's multi-head latent attention (DeepSeek-V2,
2024, Sec. 2.1.2).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError, InputError

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
GIB = 1024**3


@dataclass
class ArchSpec:
    """Architecture numbers of a (MoE) transformer, general enough for the public MoE families."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int  # decoder layers (all layers of a decoder-only model)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int  # dense FFN hidden (dense layers)
    ffn_act: str = (
        "swiglu"  # experts (and dense layers unless dense_act): swiglu 3 matrices, else 2
    )
    dense_act: str | None = None  # activation of the dense FFN layers when it differs
    num_experts: int = 0  # 0 = dense model
    top_k: int = 0
    expert_d_ff: int = 0
    shared_d_ff: int = 0  # total hidden of the always-on shared expert(s), 0 = none
    shared_gate: bool = False  # Qwen2-MoE sigmoid gate on the shared expert (D params)
    router_bias: bool = False  # per-expert bias (DeepSeek-V3 e_score_correction_bias)
    moe_every: int = 1
    first_k_dense: int = 0
    tie_embeddings: bool = False
    qk_norm: str = "none"  # none | head (RMSNorm over head_dim) | full (over all heads)
    attention: str = "gqa"  # gqa | mla
    q_lora_rank: int = 0  # MLA (0 = full-rank query projection)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_encoder_layers: int = 0  # encoder-decoder (Switch/T5): encoder stack; decoder has cross-attn
    published_total: float | None = None  # parameters reported by the authors
    published_active: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"ArchSpec({self.name}).{f}={v!r}: must be a positive int")
        if self.dense_act not in (None, "swiglu", "gelu", "relu"):
            raise ConfigError(
                f"ArchSpec({self.name}).dense_act={self.dense_act!r}: None, swiglu, gelu or relu"
            )
        if self.ffn_act not in ("swiglu", "gelu", "relu"):
            raise ConfigError(
                f"ArchSpec({self.name}).ffn_act={self.ffn_act!r}: swiglu, gelu or relu"
            )
        if self.attention not in ("gqa", "mla"):
            raise ConfigError(f"ArchSpec({self.name}).attention={self.attention!r}: gqa or mla")
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError(f"ArchSpec({self.name}).qk_norm={self.qk_norm!r}: none, head or full")
        if self.num_experts and not (1 <= self.top_k <= self.num_experts and self.expert_d_ff > 0):
            raise ConfigError(
                f"ArchSpec({self.name}): MoE needs 1 <= top_k <= num_experts and expert_d_ff > 0, "
                f"got top_k={self.top_k}, num_experts={self.num_experts}, expert_d_ff={self.expert_d_ff}"
            )
        if self.attention == "mla" and not (
            self.kv_lora_rank and self.qk_rope_head_dim and self.v_head_dim
        ):
            raise ConfigError(
                f"ArchSpec({self.name}): MLA needs kv_lora_rank, qk_rope_head_dim and v_head_dim"
            )

    def is_moe_layer(self, i: int) -> bool:
        """Same placement rule as MoETransformerConfig (GShard alternation, DeepSeek first-k-dense)."""
        return self.num_experts > 0 and i >= self.first_k_dense and (i + 1) % self.moe_every == 0

    @property
    def n_mats(self) -> int:
        """Matrices per FFN: 3 for SwiGLU, else 2."""
        return 3 if self.ffn_act == "swiglu" else 2

    @property
    def dense_n_mats(self) -> int:
        """Matrices per dense FFN."""
        return 3 if (self.dense_act or self.ffn_act) == "swiglu" else 2

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        """Build from a dict, rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"ArchSpec: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class CalcResult:
    """Everything `moelab calc` prints for one architecture."""

    name: str
    total_params: int
    active_params: int
    embedding_params: int
    expert_params: int  # all routed experts
    flops_per_token_fwd: int
    flops_per_token_train: int
    seq_len: int
    weight_bytes: dict[str, int]  # per precision
    kv_bytes_per_token: int  # at kv_dtype
    kv_dtype: str
    memory_gib: float | None
    weight_dtype: str
    kv_tokens_fit: int | None  # tokens of KV cache beside the weights (None: no memory given)
    sequences_fit: int | None  # kv_tokens_fit // seq_len

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


# ---------------------------------------------------------------------------- counting
def _attention_params(s: ArchSpec) -> int:
    """Parameters of one self-attention sublayer (no biases)."""
    D = s.d_model
    if s.attention == "mla":
        qk = s.qk_nope_head_dim + s.qk_rope_head_dim
        q = (
            (D * s.q_lora_rank + s.q_lora_rank + s.q_lora_rank * s.n_heads * qk)
            if s.q_lora_rank
            else D * s.n_heads * qk
        )
        kv = D * (s.kv_lora_rank + s.qk_rope_head_dim) + s.kv_lora_rank
        kv += s.kv_lora_rank * s.n_heads * (s.qk_nope_head_dim + s.v_head_dim)
        return q + kv + s.n_heads * s.v_head_dim * D
    q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    norms = {"none": 0, "head": 2 * s.head_dim, "full": q_out + kv_out}[s.qk_norm]
    return D * q_out + 2 * D * kv_out + q_out * D + norms


def _attention_flops(s: ArchSpec, seq_len: int) -> int:
    """FLOPs per token of one attention sublayer: projections + scores + weighted values."""
    if s.attention == "mla":
        score = 2 * seq_len * s.n_heads * (s.qk_nope_head_dim + s.qk_rope_head_dim + s.v_head_dim)
    else:
        score = 2 * 2 * seq_len * s.n_heads * s.head_dim
    return 2 * _attention_params(s) + score


def _ffn(s: ArchSpec, moe: bool) -> tuple[int, int, int]:
    """(total params, active params, forward FLOPs per token) of one FFN sublayer."""
    D = s.d_model
    if not moe:
        p = s.dense_n_mats * D * s.d_ff
        return p, p, 2 * p
    expert = s.n_mats * D * s.expert_d_ff
    router = D * s.num_experts + (s.num_experts if s.router_bias else 0)
    shared = s.n_mats * D * s.shared_d_ff + (D if s.shared_gate else 0)
    flops = 2 * (D * s.num_experts + s.top_k * expert + shared)  # bias adds are not matmul FLOPs
    return s.num_experts * expert + router + shared, s.top_k * expert + router + shared, flops


def count(s: ArchSpec, seq_len: int = 4096) -> tuple[int, int, int, int, int]:
    """(total params, active params, embedding params, routed expert params, forward FLOPs/token)."""
    D = s.d_model
    embedding = s.vocab_size * D * (1 if s.tie_embeddings else 2)
    total = active = embedding + D  # + final norm
    experts = 0
    flops = 2 * D * s.vocab_size  # LM head
    stacks = [(s.n_encoder_layers, False), (s.n_layers, s.n_encoder_layers > 0)]
    if s.n_encoder_layers:
        total += D  # encoder final norm
        active += D
    attn = _attention_params(s)
    for n, cross in stacks:
        for i in range(n):
            moe = s.is_moe_layer(i)
            ffn_total, ffn_active, ffn_flops = _ffn(s, moe)
            n_attn = 2 if cross else 1
            norms = D * (n_attn + 1)
            total += n_attn * attn + ffn_total + norms
            active += n_attn * attn + ffn_active + norms
            if moe:
                experts += s.num_experts * s.n_mats * D * s.expert_d_ff
            flops += n_attn * _attention_flops(s, seq_len) + ffn_flops
    return total, active, embedding, experts, flops


def kv_bytes_per_token(s: ArchSpec, dtype: str = "bf16") -> int:
    """Bytes of KV cache one token occupies across all decoder layers."""
    per_layer = (
        s.kv_lora_rank + s.qk_rope_head_dim
        if s.attention == "mla"
        else 2 * s.n_kv_heads * s.head_dim
    )
    return int(s.n_layers * per_layer * _bytes(dtype))


def _bytes(dtype: str) -> float:
    if dtype not in BYTES_PER_PARAM:
        raise InputError(f"dtype={dtype!r}: expected one of {sorted(BYTES_PER_PARAM)}")
    return BYTES_PER_PARAM[dtype]


def calculate(
    s: ArchSpec,
    seq_len: int = 4096,
    memory_gib: float | None = None,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
) -> CalcResult:
    """All numbers for one architecture; memory_gib (GiB = 2^30 bytes) enables the KV-fit estimate."""
    if seq_len < 1:
        raise InputError(f"seq_len={seq_len}: must be >= 1")
    if memory_gib is not None and memory_gib <= 0:
        raise InputError(f"memory_gib={memory_gib} (calc --memory-gb): expected a size in GiB > 0")
    total, active, embedding, experts, flops = count(s, seq_len)
    weights = {
        d: int(total * b)
        for d, b in BYTES_PER_PARAM.items()
        if d in ("fp32", "bf16", "fp8", "int4")
    }
    kv = kv_bytes_per_token(s, kv_dtype)
    fit = seqs = None
    if memory_gib is not None:
        free = memory_gib * GIB - total * _bytes(weight_dtype)
        fit = max(0, int(free // kv))
        seqs = fit // seq_len
    return CalcResult(
        name=s.name,
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        expert_params=experts,
        flops_per_token_fwd=flops,
        flops_per_token_train=3 * flops,
        seq_len=seq_len,
        weight_bytes=weights,
        kv_bytes_per_token=kv,
        kv_dtype=kv_dtype,
        memory_gib=memory_gib,
        weight_dtype=weight_dtype,
        kv_tokens_fit=fit,
        sequences_fit=seqs,
    )


def from_model_config(cfg, name: str = "moelab model") -> ArchSpec:
    """ArchSpec of a MoETransformerConfig (same counts as MoETransformer.stats for learned routers)."""
    m = cfg.moe
    return ArchSpec(
        name=name,
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        d_ff=cfg.d_ff,
        ffn_act=m.expert_act if m is not None else cfg.dense_act,
        dense_act=cfg.dense_act,
        num_experts=m.num_experts if m is not None else 0,
        top_k=m.top_k if m is not None else 0,
        expert_d_ff=m.d_ff if m is not None else 0,
        shared_d_ff=m.shared_hidden if m is not None else 0,
        shared_gate=bool(m is not None and m.num_shared_experts > 0 and m.shared_gate),
        router_bias=bool(m is not None and m.router_bias),
        moe_every=cfg.moe_every,
        first_k_dense=cfg.first_k_dense,
        tie_embeddings=cfg.tie_embeddings,
    )


def load_spec(path: str | Path) -> ArchSpec:
    """ArchSpec from a JSON/YAML file: an ArchSpec dict, a MoETransformerConfig dict, or a model dir."""
    from moelab.models.config import MoETransformerConfig

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InputError(
            f"calc --config: {p} does not exist (expected a JSON/YAML file or model dir)"
        )
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one clear error
        raise InputError(f"calc --config: cannot parse {p}: {exc}") from None
    if not isinstance(d, dict):
        raise InputError(f"calc --config: {p} must hold a mapping, got {type(d).__name__}")
    if "name" in d and "n_layers" in d and "head_dim" in d:
        return ArchSpec.from_dict(d)
    return from_model_config(MoETransformerConfig.from_dict(d), name=p.parent.name or p.stem)


# ----------------------------------------------------------------------------- presets
PRESETS: dict[str, ArchSpec] = {
    s.name: s
    for s in [
        ArchSpec(
            name="Mixtral-8x7B",
            vocab_size=32000,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_ff=14336,
            num_experts=8,
            top_k=2,
            expert_d_ff=14336,
            published_total=46.7e9,
            published_active=12.9e9,
            source="Jiang et al. 2024, Mixtral of Experts; config.json of mistralai/Mixtral-8x7B-v0.1",
        ),
        ArchSpec(
            name="DeepSeek-V3",
            vocab_size=129280,
            d_model=7168,
            n_layers=61,
            n_heads=128,
            n_kv_heads=128,
            head_dim=192,
            d_ff=18432,
            num_experts=256,
            top_k=8,
            expert_d_ff=2048,
            shared_d_ff=2048,
            router_bias=True,
            first_k_dense=3,
            attention="mla",
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            published_total=671e9,
            published_active=37e9,
            source="DeepSeek-AI 2024, DeepSeek-V3 Technical Report (main model, without the MTP module)",
        ),
        ArchSpec(
            name="Qwen3-30B-A3B",
            vocab_size=151936,
            d_model=2048,
            n_layers=48,
            n_heads=32,
            n_kv_heads=4,
            head_dim=128,
            d_ff=6144,
            num_experts=128,
            top_k=8,
            expert_d_ff=768,
            qk_norm="head",
            published_total=30.5e9,
            published_active=3.3e9,
            source="Qwen Team 2025, Qwen3 Technical Report; config.json of Qwen/Qwen3-30B-A3B",
        ),
        ArchSpec(
            name="OLMoE-1B-7B",
            vocab_size=50304,
            d_model=2048,
            n_layers=16,
            n_heads=16,
            n_kv_heads=16,
            head_dim=128,
            d_ff=1024,
            num_experts=64,
            top_k=8,
            expert_d_ff=1024,
            qk_norm="full",
            published_total=6.9e9,
            published_active=1.3e9,
            source="Muennighoff et al. 2024, OLMoE: Open Mixture-of-Experts Language Models",
        ),
        ArchSpec(
            name="Llama-4-Scout",
            vocab_size=202048,
            d_model=5120,
            n_layers=48,
            n_heads=40,
            n_kv_heads=8,
            head_dim=128,
            d_ff=16384,
            num_experts=16,
            top_k=1,
            expert_d_ff=8192,
            shared_d_ff=8192,
            published_total=109e9,
            published_active=17e9,
            source="Meta 2025, Llama 4 model card (text model; the published total includes the vision encoder)",
        ),
        ArchSpec(
            name="Llama-4-Maverick",
            vocab_size=202048,
            d_model=5120,
            n_layers=48,
            n_heads=40,
            n_kv_heads=8,
            head_dim=128,
            d_ff=16384,
            num_experts=128,
            top_k=1,
            expert_d_ff=8192,
            shared_d_ff=8192,
            moe_every=2,
            published_total=400e9,
            published_active=17e9,
            source="Meta 2025, Llama 4 model card; interleave_moe_layer_step=2",
        ),
        ArchSpec(
            name="Switch-base-8",
            vocab_size=32128,
            d_model=768,
            n_layers=12,
            n_encoder_layers=12,
            n_heads=12,
            n_kv_heads=12,
            head_dim=64,
            d_ff=3072,
            ffn_act="relu",
            num_experts=8,
            top_k=1,
            expert_d_ff=3072,
            moe_every=2,
            tie_embeddings=True,
            published_total=620e6,
            published_active=None,
            source="Fedus et al. 2022, Switch Transformers; google/switch-base-8 (T5-base, experts every other FFN)",
        ),
    ]
}


def get_preset(name: str) -> ArchSpec:
    """Preset by name (case-insensitive)."""
    for key, spec in PRESETS.items():
        if key.lower() == name.lower():
            return spec
    raise InputError(f"calc: unknown preset {name!r}; available: {', '.join(PRESETS)}")


def format_report(r: CalcResult) -> str:
    """Human-readable text summary (the CLI renders the same numbers as a rich table)."""
    lines = [
        f"{r.name}",
        f"  parameters: total {r.total_params / 1e9:.3f} B, active {r.active_params / 1e9:.3f} B "
        f"({100 * r.active_params / r.total_params:.1f}%), routed experts {r.expert_params / 1e9:.3f} B",
        f"  FLOPs/token (seq {r.seq_len}): forward {r.flops_per_token_fwd / 1e9:.2f} G, "
        f"training {r.flops_per_token_train / 1e9:.2f} G",
        "  weights: " + ", ".join(f"{d} {b / GIB:.2f} GiB" for d, b in r.weight_bytes.items()),
        f"  KV cache per token ({r.kv_dtype}): {r.kv_bytes_per_token / 1024:.1f} KiB",
    ]
    if r.memory_gib is not None:
        lines.append(
            f"  in {r.memory_gib:g} GiB with {r.weight_dtype} weights: {r.kv_tokens_fit:,} KV tokens "
            f"= {r.sequences_fit:,} sequences of {r.seq_len}"
        )
    return "\n".join(lines)
