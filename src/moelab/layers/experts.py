"""Expert banks: E feed-forward experts stored as stacked weights [E, ...] (SwiGLU, GELU or ReLU).

Layout matches transformers v5 (`gate_up_proj [E, 2F, D]` with the gate rows first, then the
up rows; `down_proj [E, D, F]`) so weights copy across without transposes. SwiGLU is
Shazeer (2020) "GLU Variants Improve Transformer", FFN_SwiGLU(x) = (silu(x W) * x V) W2 (Eq. 6);
GELU/ReLU experts are the plain two-matrix FFN of Switch Transformers (Fedus et al. 2021).

`forward_one(e, x)` runs a single expert on a slice of tokens; dispatch and offloading both go
through it. With `out=` (inference only) it writes into a caller buffer and does the activation
in place, which keeps the per-expert loop free of large allocations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import ConfigError, InputError


class ExpertBank(nn.Module):
    """E experts; SwiGLU: down(silu(gate(x)) * up(x)); GELU/ReLU: down(act(up(x)))."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        act: str = "swiglu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if act not in ("swiglu", "gelu", "relu"):
            raise ConfigError(f"ExpertBank: act={act!r}; expected 'swiglu', 'gelu' or 'relu'")
        for name, v in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"ExpertBank: {name}={v!r}; expected a positive int")
        self.num_experts, self.d_model, self.d_ff, self.act = num_experts, d_model, d_ff, act
        n_in = 2 * d_ff if act == "swiglu" else d_ff
        kw = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, n_in, d_model, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **kw))
        self.reset_parameters()

    @property
    def n_in(self) -> int:
        """Rows of one expert's first projection (2F for SwiGLU, F otherwise)."""
        return int(self.gate_up_proj.shape[1])

    def reset_parameters(self) -> None:
        """Kaiming-uniform per expert, as nn.Linear would initialise each one."""
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def expert_params(self, e: int) -> dict[str, torch.Tensor]:
        """Views of expert e's weights (what an expert store saves and a cache holds)."""
        if not 0 <= e < self.num_experts:
            raise InputError(f"ExpertBank: expert index {e} out of range [0, {self.num_experts})")
        return {"gate_up_proj": self.gate_up_proj[e], "down_proj": self.down_proj[e]}

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden activation of the first projection's output h [n, n_in] -> [n, F]."""
        if self.act == "swiglu":
            g, u = h.chunk(2, dim=-1)
            return F.silu(g) * u
        if self.act == "gelu":
            return F.gelu(h)
        return F.relu(h)

    def apply_params(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        workspace: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one expert given its weights on x [n, D] -> [n, D].

        With `out` [n, D] (and optionally `workspace` [>= n, n_in]) the result is written into
        `out` with in-place activation; use only where no gradient is needed.
        """
        gu, down = params["gate_up_proj"], params["down_proj"]
        if out is None:
            return self.activate(x @ gu.t()) @ down.t()
        n = x.shape[0]
        h = workspace[:n] if workspace is not None else None
        h = torch.mm(x, gu.t(), out=h) if h is not None else torch.mm(x, gu.t())
        if self.act == "swiglu":
            f = h.shape[1] // 2
            a = h[:, :f]  # row stride 2F: BLAS takes it without a copy
            F.silu(a, inplace=True)
            a.mul_(h[:, f:])
        elif self.act == "gelu":
            a = torch.ops.aten.gelu_(h)
        else:
            a = h.relu_()
        return torch.mm(a, down.t(), out=out)

    def forward_one(
        self,
        e: int,
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        workspace: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run expert e on x [n, D] (optionally into `out`, inference only)."""
        return self.apply_params(self.expert_params(e), x, out=out, workspace=workspace)

    def forward_sorted(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by expert (`counts[e]` rows for expert e) -> outputs [S, D], differentiable.

        Same numbers as calling forward_one per slice; one autograd node with a hand-written
        backward that reuses buffers (fewer allocations and passes than generic autograd).
        """
        return sorted_expert_mlp(xs, self.gate_up_proj, self.down_proj, counts, self.act)

    def forward_grouped(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """All experts at once on rows sorted by expert: `F.grouped_mm` with int32 `offsets`
        (cumulative row counts, [E]). Rows past offsets[-1] are undefined."""
        h = grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offsets)
        return grouped_mm(self.activate(h), self.down_proj.transpose(-2, -1), offsets)

    def expert_nbytes(self) -> int:
        """Bytes of one expert's weights."""
        return sum(p.numel() * p.element_size() for p in self.expert_params(0).values())

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, act={self.act}"


def grouped_mm_available() -> bool:
    """True if this torch has `F.grouped_mm` or `torch._grouped_mm`."""
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[rows of group g] = a[rows of group g] @ b[g]; a [S, K], b [G, K, N], offsets [G] int32."""
    if not grouped_mm_available():
        raise ConfigError(
            f"dispatch_backend='grouped_mm' needs torch.nn.functional.grouped_mm or "
            f"torch._grouped_mm; torch {torch.__version__} has neither: use dispatch_backend='loop'"
        )
    align = 16 // a.element_size()
    if a.shape[1] % align or b.shape[2] % align:
        raise ConfigError(
            f"dispatch_backend='grouped_mm' needs d_model and expert d_ff to be multiples of {align} "
            f"for {a.dtype} (16-byte strides); got inner size {a.shape[1]}, output size "
            f"{b.shape[2]}: use dispatch_backend='loop'"
        )
    fn = F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm
    try:
        return fn(a, b, offs=offsets)
    except (RuntimeError, NotImplementedError) as exc:
        raise ConfigError(
            f"dispatch_backend='grouped_mm' failed on device {a.device.type} with dtype {a.dtype} "
            f"in torch {torch.__version__} ({exc}); use dispatch_backend='loop'"
        ) from exc


def sorted_expert_mlp(
    xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int], act: str
) -> torch.Tensor:
    """Expert e's FFN on its `counts[e]` consecutive rows of xs; weights [E, n_in, D], [E, D, F]."""
    if sum(counts) != xs.shape[0] or len(counts) != gate_up.shape[0]:
        raise InputError(
            f"sorted_expert_mlp: counts sum to {sum(counts)} over {len(counts)} experts, expected "
            f"{xs.shape[0]} rows over {gate_up.shape[0]} experts"
        )
    return _SortedExperts.apply(xs, gate_up, down, tuple(counts), act)


def _act_forward(act: str, h: torch.Tensor, out: torch.Tensor) -> None:
    """out = activation(h) for a pre-activation slice h [n, n_in]."""
    if act == "swiglu":
        f = h.shape[1] // 2
        torch.mul(F.silu(h[:, :f]), h[:, f:], out=out)
    elif act == "gelu":
        out.copy_(F.gelu(h))
    else:
        torch.clamp_min(h, 0, out=out)


def _act_backward(act: str, da: torch.Tensor, h: torch.Tensor, dh: torch.Tensor) -> None:
    """dh = d activation / d h applied to da (writes dh [n, n_in])."""
    if act == "swiglu":
        f = h.shape[1] // 2
        g, u = h[:, :f], h[:, f:]
        torch.mul(da, F.silu(g), out=dh[:, f:])
        dh[:, :f] = torch.ops.aten.silu_backward(da * u, g)
    elif act == "gelu":
        dh.copy_(torch.ops.aten.gelu_backward(da, h))
    else:
        dh.copy_(torch.ops.aten.threshold_backward(da, h, 0))


class _SortedExperts(torch.autograd.Function):
    """All experts over expert-sorted rows, with a buffer-reusing backward."""

    @staticmethod
    def forward(ctx, xs, gu, down, counts, act):  # noqa: D102
        S, n_in, f = xs.shape[0], gu.shape[1], down.shape[2]
        h = xs.new_empty(S, n_in)
        a = xs.new_empty(S, f)
        ys = xs.new_empty(S, down.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                sl = slice(start, start + n)
                torch.mm(xs[sl], gu[e].t(), out=h[sl])
                _act_forward(act, h[sl], a[sl])
                torch.mm(a[sl], down[e].t(), out=ys[sl])
                start += n
        ctx.save_for_backward(xs, gu, down, h, a)
        ctx.counts, ctx.act = counts, act
        return ys

    @staticmethod
    def backward(ctx, dys):  # noqa: D102
        xs, gu, down, h, a = ctx.saved_tensors
        need_x, need_gu, need_down = ctx.needs_input_grad[:3]
        dys = dys.contiguous()
        dxs = torch.empty_like(xs) if need_x else None
        dgu = torch.zeros_like(gu) if need_gu else None
        ddown = torch.zeros_like(down) if need_down else None
        nmax = max(ctx.counts) if ctx.counts else 0
        da = xs.new_empty(nmax, down.shape[2])
        dh = xs.new_empty(nmax, gu.shape[1])
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            sl = slice(start, start + n)
            start += n
            if need_down:
                torch.mm(dys[sl].t(), a[sl], out=ddown[e])
            if not (need_x or need_gu):
                continue
            torch.mm(dys[sl], down[e], out=da[:n])
            _act_backward(ctx.act, da[:n], h[sl], dh[:n])
            if need_gu:
                torch.mm(dh[:n].t(), xs[sl], out=dgu[e])
            if need_x:
                torch.mm(dh[:n], gu[e], out=dxs[sl])
        return dxs, dgu, ddown, None, None
