"""Collectives of expert parallelism: a differentiable all-to-all and a byte counter.

Expert parallelism (GShard, Lepikhin et al. 2020, Sec. 2.3; Switch Transformers, Fedus et al.
2021, Sec. 5.6) exchanges tokens between processes twice per MoE layer: dispatch (each token to
the process holding its expert) and combine (the expert outputs back). Both are
`all_to_all_single` with uneven splits; the backward of an all-to-all is the all-to-all with
send and receive splits swapped, so gradients reach the tokens' home processes and the experts'
owners exactly as in one process. `CommStats` counts the bytes each process sends to the others
(its own share stays local and is not counted) and the payload of the gradient all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CommStats", "all_to_all", "exchange_counts"]


@dataclass
class CommStats:
    """Bytes this process sent to other processes, by kind (reset per training step)."""

    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int) -> None:
        """Count n more bytes of `kind` ("all_to_all_tokens", "all_to_all_counts", "all_reduce")."""
        self.bytes[kind] = self.bytes.get(kind, 0) + int(n)

    def total(self) -> int:
        """All bytes counted."""
        return sum(self.bytes.values())

    def reset(self) -> dict[str, int]:
        """Return the counts so far and start again from zero."""
        out, self.bytes = dict(self.bytes), {}
        return out


def _sent_bytes(t: torch.Tensor, splits: list[int], rank: int) -> int:
    """Bytes of the rows of t that leave this process (all splits but its own)."""
    row = t[0].numel() * t.element_size() if t.dim() > 1 else t.element_size()
    return (sum(splits) - splits[rank]) * row


def exchange_counts(
    send: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats | None = None
) -> torch.Tensor:
    """send [P, n] int64 (row p: what goes to process p) -> recv [P, n] (row p: from process p)."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    if stats is not None:
        P, rank = send.shape[0], dist.get_rank(group)
        stats.add("all_to_all_counts", _sent_bytes(send, [1] * P, rank))
    return recv


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward = the reverse exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, send, recv, group, stats):  # noqa: D102
        ctx.send, ctx.recv, ctx.group, ctx.stats = send, recv, group, stats
        return _exchange(x, send, recv, group, stats)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        g = _exchange(grad.contiguous(), ctx.recv, ctx.send, ctx.group, ctx.stats)
        return g, None, None, None, None


def _exchange(
    x: torch.Tensor,
    send: list[int],
    recv: list[int],
    group: dist.ProcessGroup | None,
    stats: CommStats | None,
) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group
    )
    if stats is not None:
        stats.add("all_to_all_tokens", _sent_bytes(x, send, dist.get_rank(group)))
    return out


def all_to_all(
    x: torch.Tensor,
    send: list[int],
    recv: list[int],
    group: dist.ProcessGroup | None = None,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Rows of x [sum(send), ...]: send[p] consecutive rows to process p; returns the
    [sum(recv), ...] rows received (recv[p] from process p, in process order); differentiable."""
    return _AllToAll.apply(x, list(send), list(recv), group, stats)
