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

    def __post_init__(self) -> None:
        self.validate()

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
