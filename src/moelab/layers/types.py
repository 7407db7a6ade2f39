"""Central routing type shared by every router, block, model, tracer and predictor (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch


class LazyAux(Mapping):
    """Auxiliary loss terms computed on first access: inference (decode, tracing, offloading)
    never reads them, training and evaluation read exactly the values an eager dict held."""

    def __init__(self, compute: Callable[[], dict[str, torch.Tensor]]) -> None:
        self._compute: Callable[[], dict[str, torch.Tensor]] | None = compute
        self._terms: dict[str, torch.Tensor] = {}

    def _get(self) -> dict[str, torch.Tensor]:
        if self._compute is not None:
            self._terms, self._compute = self._compute(), None
        return self._terms

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return "LazyAux(pending)" if self._compute is not None else f"LazyAux({self._terms!r})"


@dataclass
class RoutingResult:
    """What a router decided for a flat batch of T tokens.

    expert_ids: [T, k] int64 chosen experts per token slot (token-choice: k distinct experts).
    weights:    [T, k] combine weights (0 where a slot is dropped or unused).
    logits:     [T, E] raw router logits (pre-softmax/sigmoid), used by losses and traces.
    aux:        named auxiliary loss terms (already multiplied by nothing: raw values); a
                LazyAux where computing them costs a pass over the logits.
    dropped:    [T, k] bool, True where the slot is not computed (capacity overflow, or an
                unused slot in expert-choice routing). None means no slot is dropped.
    scores:     [T, E] the probabilities/affinities the selection used (softmax or sigmoid),
                before any selection bias; None if identical to softmax(logits).
    capacity_map: [T, E] bool, Megatron-Core's padded routing map when
                `MoEConfig.pad_to_capacity` (every expert filled to its capacity; padded
                (token, expert) pairs carry weight 0, so the combine is unchanged); else None.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    aux: Mapping[str, torch.Tensor] = field(default_factory=dict)
    dropped: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    capacity_map: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Number of routed tokens T."""
        return int(self.expert_ids.shape[0])

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return int(self.logits.shape[-1])

    @property
    def top_k(self) -> int:
        """Slots per token k."""
        return int(self.expert_ids.shape[1])

    def active_mask(self) -> torch.Tensor:
        """[T, k] bool: slots that are actually computed."""
        if self.dropped is None:
            return torch.ones_like(self.expert_ids, dtype=torch.bool)
        return ~self.dropped

    def expert_counts(self) -> torch.Tensor:
        """[E] number of computed (token, expert) assignments per expert."""
        ids = self.expert_ids[self.active_mask()]
        return torch.bincount(ids.flatten(), minlength=self.num_experts)
