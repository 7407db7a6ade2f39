"""MoEConfig: one validated dataclass describing an MoE block (router, experts, shared experts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from moelab.errors import ConfigError

ROUTER_TYPES = (
    "topk",  # softmax top-k, Mixtral / Qwen / OLMoE semantics
    "noisy_topk",  # Shazeer et al. 2017 noisy top-k gating
    "switch",  # Switch Transformer top-1 with capacity
    "gshard",  # GShard top-2 with random routing of the second expert
    "expert_choice",  # Zhou et al. 2022
    "hash",  # Roller et al. 2021 hash layers
    "sinkhorn",  # Clark et al. 2022 Sinkhorn-BASE balanced assignment
    "deepseek",  # DeepSeek-V3 sigmoid, group-limited, aux-loss-free bias
)
EXPERT_ACTS = ("swiglu", "gelu", "relu")  # relu: Switch Transformers / T5 experts
CAPACITY_CONVENTIONS = ("switch", "megatron")
CAPACITY_ROUNDINGS = ("ceil", "floor")  # floor: lucidrains / st-moe-pytorch int(S*cf/E)
CAPACITY_SCOPES = ("batch", "row")  # row: per batch row (transformers Switch, lucidrains GShard)
DROP_POLICIES = ("slot", "position", "probs")  # see moelab.layers.routing (capacity)
GROUP_SCORES = ("top2", "topk_sum")  # transformers DeepseekV3 / Megatron group_limited_topk
SEQ_AUX_LENGTHS = ("flat", "own", "mean")  # see MoEConfig.seq_aux_length
SEQ_AUX_CHOICES = ("routed", "topk")
SINKHORN_K1_WEIGHTS = ("softmax", "sigmoid")
BALANCE_COUNTS = ("chosen", "kept")  # first choices before / after capacity (ST-MoE: kept)

# Named conventions: MoEConfig(convention=name) sets these fields (only those left at their
# defaults; see MoEConfig.convention). The table in docs/guide/01-layers.md maps each option to
# the Megatron-Core argument and the transformers / lucidrains / st-moe-pytorch equivalent.
CONVENTIONS: dict[str, dict[str, Any]] = {
    "megatron": {  # megatron-core 0.16.1 TopKRouter + moe_utils
        "capacity_convention": "megatron",
        "drop_policy": "probs",
        "group_score": "topk_sum",
        "seq_aux_length": "mean",
        "seq_aux_choice": "topk",
        "sinkhorn_tol": 1e-4,
        "sinkhorn_k1_weight": "sigmoid",
    },
    "hf": {  # transformers 5.x routers (Switch capacity per sequence; DeepseekV3 top-2 groups)
        "capacity_scope": "row",
        "group_score": "top2",
    },
    "lucidrains": {  # mixture-of-experts (lucidrains) Top2Gating, GShard per sequence
        "capacity_scope": "row",
        "capacity_rounding": "floor",
        "min_capacity": 4,
        "balance_count": "chosen",
    },
    "st_moe": {  # st-moe-pytorch TopNGating: balance loss over first choices kept by capacity
        "capacity_scope": "row",
        "capacity_rounding": "floor",
        "min_capacity": 4,
        "balance_count": "kept",
    },
}
# Router-specific preset values: (convention, router) -> fields.
ROUTER_CONVENTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("megatron", "sinkhorn"): {"norm_topk_prob": False},  # Megatron: softmax, not renormalised
}
DISPATCH_BACKENDS = ("loop", "grouped_mm")  # see moelab.layers.dispatch


@dataclass
class MoEConfig:
    """Everything needed to build one MoEBlock. Defaults run on a laptop CPU."""

    d_model: int = 64
    d_ff: int = 128  # hidden size of ONE routed expert
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    expert_act: str = "swiglu"
    norm_topk_prob: bool = True  # renormalise the k selected probabilities (Mixtral: True)
    unit_weights: bool = (
        False  # combine selected experts with weight 1 (MoEfication: sum of FFN parts)
    )
    router_bias: bool = False
    jitter_noise: float = (
        0.0  # multiplicative input jitter in training (Switch/Mixtral), not in place
    )
    capacity_factor: float | None = None  # None = no capacity limit (dropless)
    capacity_convention: str = "switch"  # switch: ceil(T*cf/E); megatron: ceil(T*k*cf/E)
    num_shared_experts: int = 0
    shared_d_ff: int | None = None  # hidden size of the shared expert (all shared experts fused)
    shared_gate: bool = False  # Qwen2-MoE sigmoid gate on the shared expert output
    routed_scaling_factor: float = 1.0  # DeepSeek-V3 multiplies routed weights by this
    n_group: int = 1  # DeepSeek group-limited routing: number of expert groups
    topk_group: int = 1  # groups kept per token
    bias_update_rate: float = 0.0  # DeepSeek aux-loss-free gamma (0 = off)
    vocab_size: int | None = None  # hash routing needs the vocabulary size
    sinkhorn_iters: int = 8
    expert_capacity: int | None = None  # fixed slots per expert; overrides capacity_factor
    noise_epsilon: float = 1e-2  # noisy_topk: floor added to softplus noise std (tensor2tensor)
    seed: int = 0  # for fixed random structures (hash table)
    dispatch_backend: str = "loop"  # loop: one torch.mm per expert; grouped_mm: F.grouped_mm
    # --- framework conventions (issue 16); defaults keep moelab's own behaviour ---
    convention: str | None = None  # preset from CONVENTIONS ("megatron", "hf", ...), None = none
    capacity_rounding: str = "ceil"  # ceil(T*cf/E) or floor (lucidrains / st-moe int())
    min_capacity: int | None = None  # floor on the capacity (lucidrains / st-moe: 4)
    capacity_scope: str = "batch"  # batch: capacity over all routed tokens; row: per batch row
    drop_policy: str = "slot"  # slot: slot-major FCFS; position / probs: Megatron drop policies
    pad_to_capacity: bool = False  # Megatron moe_pad_expert_input_to_capacity (capacity_map)
    group_score: str = "top2"  # group = sum of its top-2 (HF) or top-(k//topk_group) (Megatron)
    seq_aux_length: str = "flat"  # flat: one sequence; own: per row; mean: rows, n_valid/B each
    seq_aux_choice: str = "routed"  # routed: the biased/grouped choice; topk: plain top-k scores
    sinkhorn_tol: float | None = None  # None: sinkhorn_iters log-space steps; else Megatron's loop
    sinkhorn_max_iters: int = 1000  # cap on Megatron-style iterations (sinkhorn_tol set)
    sinkhorn_k1_weight: str = "softmax"  # k=1 weight: softmax prob or sigmoid(logit) (Megatron)
    balance_count: str = "chosen"  # first-choice balance loss: chosen (lucidrains) or kept (ST-MoE)

    def __post_init__(self) -> None:
        self.apply_convention()
        self.validate()

    def apply_convention(self) -> None:
        """Set the fields of the `convention` preset that are still at their defaults.

        A field given explicitly with a non-default value wins over the preset; to keep a
        default value the preset would change, leave `convention` None and set the fields.
        """
        if self.convention is None:
            return
        if self.convention not in CONVENTIONS:
            raise ConfigError(
                f"MoEConfig.convention={self.convention!r}: must be one of "
                f"{sorted(CONVENTIONS)} or None"
            )
        defaults = {f.name: f.default for f in fields(self)}
        preset = dict(CONVENTIONS[self.convention])
        preset.update(ROUTER_CONVENTIONS.get((self.convention, self.router), {}))
        for name, value in preset.items():
            if getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"MoEConfig.{name}={getattr(self, name)!r}: {msg}")

        need(
            isinstance(self.d_model, int) and self.d_model > 0, "d_model", "must be a positive int"
        )
        need(isinstance(self.d_ff, int) and self.d_ff > 0, "d_ff", "must be a positive int")
        need(
            isinstance(self.num_experts, int) and self.num_experts >= 1,
            "num_experts",
            "must be >= 1",
        )
        need(isinstance(self.top_k, int) and self.top_k >= 1, "top_k", "must be >= 1")
        need(
            self.top_k <= self.num_experts,
            "top_k",
            f"must be <= num_experts ({self.num_experts})",
        )
        need(self.router in ROUTER_TYPES, "router", f"must be one of {ROUTER_TYPES}")
        need(self.expert_act in EXPERT_ACTS, "expert_act", f"must be one of {EXPERT_ACTS}")
        need(
            self.capacity_factor is None or self.capacity_factor > 0,
            "capacity_factor",
            "must be > 0 (or None for no capacity limit)",
        )
        need(
            self.capacity_convention in CAPACITY_CONVENTIONS,
            "capacity_convention",
            f"must be one of {CAPACITY_CONVENTIONS}",
        )
        need(
            self.dispatch_backend in DISPATCH_BACKENDS,
            "dispatch_backend",
            f"must be one of {DISPATCH_BACKENDS}",
        )
        need(self.jitter_noise >= 0, "jitter_noise", "must be >= 0")
        need(
            self.expert_capacity is None
            or (isinstance(self.expert_capacity, int) and self.expert_capacity >= 1),
            "expert_capacity",
            "must be an int >= 1 (or None to derive it from capacity_factor)",
        )
        need(
            self.convention is None or self.convention in CONVENTIONS,
            "convention",
            f"must be one of {sorted(CONVENTIONS)} or None",
        )
        for name, allowed in (
            ("capacity_rounding", CAPACITY_ROUNDINGS),
            ("capacity_scope", CAPACITY_SCOPES),
            ("drop_policy", DROP_POLICIES),
            ("group_score", GROUP_SCORES),
            ("seq_aux_length", SEQ_AUX_LENGTHS),
            ("seq_aux_choice", SEQ_AUX_CHOICES),
            ("sinkhorn_k1_weight", SINKHORN_K1_WEIGHTS),
            ("balance_count", BALANCE_COUNTS),
        ):
            need(getattr(self, name) in allowed, name, f"must be one of {allowed}")
        need(
            self.min_capacity is None
            or (isinstance(self.min_capacity, int) and self.min_capacity >= 1),
            "min_capacity",
            "must be an int >= 1 (or None for no floor)",
        )
        need(
            self.drop_policy == "slot" or self.capacity_scope == "batch",
            "drop_policy",
            "Megatron's drop policies ('position', 'probs') work over the whole batch; "
            "use capacity_scope='batch' (or drop_policy='slot' for per-row capacity)",
        )
        need(
            not self.pad_to_capacity or self.drop_policy in ("position", "probs"),
            "pad_to_capacity",
            "is Megatron's option; it needs drop_policy 'position' or 'probs'",
        )
        need(
            self.sinkhorn_tol is None or self.sinkhorn_tol > 0,
            "sinkhorn_tol",
            "must be > 0 (or None for a fixed number of iterations)",
        )
        need(self.sinkhorn_max_iters >= 1, "sinkhorn_max_iters", "must be >= 1")
        need(self.noise_epsilon >= 0, "noise_epsilon", "must be >= 0")
        need(self.sinkhorn_iters >= 1, "sinkhorn_iters", "must be >= 1")
        need(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")
        need(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
        need(self.n_group >= 1, "n_group", "must be >= 1")
        need(
            self.num_experts % self.n_group == 0,
            "n_group",
            f"must divide num_experts ({self.num_experts})",
        )
        need(
            1 <= self.topk_group <= self.n_group,
            "topk_group",
            f"must be in [1, n_group={self.n_group}]",
        )
        if self.group_score == "topk_sum" and self.n_group > 1:
            per_group = self.num_experts // self.n_group
            need(
                1 <= self.top_k // self.topk_group <= per_group,
                "group_score",
                f"'topk_sum' scores a group by its top top_k//topk_group = "
                f"{self.top_k // self.topk_group} experts; that must be in [1, {per_group}]",
            )
        if self.router == "hash":
            need(
                self.vocab_size is not None and self.vocab_size > 0,
                "vocab_size",
                "hash routing needs the vocabulary size",
            )

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the (fused) shared expert(s)."""
        if self.num_shared_experts == 0:
            return 0
        return (
            self.shared_d_ff
            if self.shared_d_ff is not None
            else self.d_ff * self.num_shared_experts
        )

    def fine_grained(self, m: int) -> MoEConfig:
        """DeepSeekMoE segmentation: m*E experts of d_ff/m with m*k active (same FLOPs)."""
        if m < 1 or self.d_ff % m != 0:
            raise ConfigError(f"fine_grained(m={m}): m must be >= 1 and divide d_ff ({self.d_ff})")
        d = self.to_dict()
        d.update(num_experts=self.num_experts * m, d_ff=self.d_ff // m, top_k=self.top_k * m)
        if self.num_shared_experts > 0 and self.shared_d_ff is None:
            # shared experts are segmented too (m*K_s of d_ff/m): the same always-on FLOPs
            d.update(num_shared_experts=self.num_shared_experts * m)
        return MoEConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        """Build from a dict, rejecting unknown keys with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"MoEConfig: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
