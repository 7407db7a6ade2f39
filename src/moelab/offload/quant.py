"""Weight-only int8 / int4 expert weights for the offload tiers, computed with torch's CPU
weight-only kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`).

int8: symmetric per-output-channel scales, w ~= q * s with q in [-127, 127] (LLM.int8()-style
absmax rows without the outlier path, Dettmers et al. 2022, arXiv:2208.07339).
int4: asymmetric groups of `group` input columns, w ~= (q - 8) * scale + zero with q in [0, 15]
(the GPTQ/AWQ group-wise grid without calibration, i.e. round-to-nearest; Frantar et al. 2023,
arXiv:2210.17323, Lin et al. 2024, arXiv:2306.00978), packed in the CPU kernel's own layout.
Scales and zeros are bf16 (the kernels' dtype) and are rounded before the codes are chosen, so
`dequantize` is exactly what the kernels multiply with. Activations enter the kernels as bf16
and the outputs return as fp32 (their bf16 rounding included; on this CPU the kernels' fp32-
activation paths ran 20-50x slower at one decode row, slower than fp32 dense); where a
kernel is missing, the weights are dequantised and multiplied in fp32 (`kernels_available()`).
`exact_arithmetic()` switches to that fp32 path on purpose, to separate what the weights cost in
quality from what the kernels' bf16 arithmetic costs (bench/bench_quant_quality.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from moelab.errors import ConfigError, OffloadError

PRECISIONS = ("full", "int8", "int4")
DEFAULT_GROUP = 64
_EXACT = contextvars.ContextVar("moelab_quant_exact", default=False)


@dataclass
class QuantWeight:
    """One quantised [N, K] weight: codes + scales (int8) or codes + scales/zeros (int4)."""

    kind: str  # "int8" | "int4"
    q: torch.Tensor  # int8 [N, K] | uint8 packed int4 (kernel layout)
    scales: torch.Tensor  # int8: bf16 [N]; int4: bf16 [K // group, N, 2] (scale, zero)
    shape: tuple[int, int]
    group: int = 0
    exact: torch.Tensor | None = field(default=None, repr=False)  # fp32 copy, exact_arithmetic()

    @property
    def nbytes(self) -> int:
        """Bytes held (codes + scales)."""
        return self.q.numel() * self.q.element_size() + self.scales.numel() * 2

    def t(self) -> torch.Tensor:  # pragma: no cover - guard against silent float use
        raise OffloadError("QuantWeight used as a float tensor; use quant.qmm(x, w)")


def kernels_available() -> dict[str, bool]:
    """Which weight-only CPU kernels this torch has."""
    return {
        "int8": hasattr(torch, "_weight_int8pack_mm"),
        "int4": hasattr(torch, "_weight_int4pack_mm_for_cpu")
        and hasattr(torch, "_convert_weight_to_int4pack_for_cpu"),
    }


def check_precision(precision: str, where: str = "precision") -> str:
    """Return `precision` if known, else raise ConfigError naming the choices."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{where}={precision!r}: expected one of {PRECISIONS}")
    return precision


def _check_2d(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(
            f"{what}: expected a 2-D float weight [N, K], got {tuple(w.shape)} {w.dtype}"
        )


# --------------------------------------------------------------------------- int8
def quantize_int8(w: torch.Tensor) -> QuantWeight:
    """Per-output-channel symmetric int8 of w [N, K]."""
    _check_2d(w, "quantize_int8")
    w = w.detach().float().cpu()
    s = (w.abs().amax(1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return QuantWeight("int8", q, s.contiguous(), (int(w.shape[0]), int(w.shape[1])))


# --------------------------------------------------------------------------- int4
def _int4_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int32 [N, K] in [0, 15] and bf16 scales/zeros [K/g, N, 2] of w [N, K]."""
    N, K = w.shape
    if group < 2 or K % group:
        raise ConfigError(
            f"int4 group={group}: must divide the input size K={K} (and be >= 2); try 32 or 64"
        )
    wg = w.reshape(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16).float()
    zero = (lo + 8.0 * scale).to(torch.bfloat16).float()  # w = (q - 8) * scale + zero
    q = torch.round((wg - zero[..., None]) / scale[..., None] + 8.0).clamp(0, 15)
    sz = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
    return q.to(torch.int32).reshape(N, K).contiguous(), sz


def quantize_int4(w: torch.Tensor, group: int = DEFAULT_GROUP) -> QuantWeight:
    """Group-wise asymmetric int4 of w [N, K] packed for torch's CPU int4 kernel."""
    _check_2d(w, "quantize_int4")
    if not kernels_available()["int4"]:
        raise OffloadError(
            f"int4 experts need torch._convert_weight_to_int4pack_for_cpu (torch {torch.__version__}"
            " has none); use precision int8"
        )
    w = w.detach().float().cpu()
    q, sz = _int4_codes(w, group)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    return QuantWeight("int4", packed.contiguous(), sz, (int(w.shape[0]), int(w.shape[1])), group)


def pick_group(shapes: dict[str, tuple[int, ...]], preferred: int = DEFAULT_GROUP) -> int:
    """Largest int4 group <= preferred (a power of two >= 16) dividing every input size K."""
    g = preferred
    while g >= 16:
        if all(int(s[1]) % g == 0 for s in shapes.values()):
            return g
        g //= 2
    raise ConfigError(
        f"int4: no group of 16..{preferred} columns divides the expert input sizes "
        f"{sorted({int(s[1]) for s in shapes.values()})}; use int8"
    )


def int4_layout_probe() -> str:
    """Fingerprint of this CPU kernel's int4 packing (stores written elsewhere may differ)."""
    if not kernels_available()["int4"]:
        return ""
    g = torch.Generator().manual_seed(1234)
    q = torch.randint(0, 16, (64, 128), generator=g, dtype=torch.int32)
    p = torch._convert_weight_to_int4pack_for_cpu(q, 1).contiguous()
    return hashlib.sha256(p.numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- compute
def dequantize(w: QuantWeight) -> torch.Tensor:
    """The fp32 weight [N, K] the kernels compute with."""
    if w.kind == "int8":
        return w.q.float() * w.scales.float()[:, None]
    if w.kind == "int4":
        N, K = w.shape
        eye = torch.eye(K, dtype=torch.float32)  # fp32 activations: exact products
        return (
            torch._weight_int4pack_mm_for_cpu(eye, w.q, w.group, w.scales.float()).t().contiguous()
        )
    raise OffloadError(f"QuantWeight kind {w.kind!r}: expected 'int8' or 'int4'")


@contextlib.contextmanager
def exact_arithmetic() -> Iterator[None]:
    """Within this block `qmm` multiplies with the dequantised weights in x's dtype (fp32): the
    quantised weights' own effect without the kernels' bf16 rounding. Each weight keeps its fp32
    copy (`QuantWeight.exact`) from its first use on, so this measures; it saves no memory."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def qmm(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [n, K] @ W.T -> [n, N] in x's dtype, with the weight-only kernel (bf16 activations and
    outputs; see `exact_arithmetic` for the fp32 reference)."""
    if x.shape[-1] != w.shape[1]:
        raise OffloadError(f"qmm: x has {x.shape[-1]} columns, weight expects K={w.shape[1]}")
    if _EXACT.get():
        if w.exact is None:  # kept while the weight lives: a measurement, not a memory tier
            w.exact = dequantize(w)
        return x @ w.exact.to(x.dtype).t()
    avail = kernels_available()
    xb = x.to(torch.bfloat16)
    if w.kind == "int8" and avail["int8"]:
        return torch._weight_int8pack_mm(xb, w.q, w.scales).to(x.dtype)
    if w.kind == "int4" and avail["int4"]:
        return torch._weight_int4pack_mm_for_cpu(xb, w.q, w.group, w.scales).to(x.dtype)
    return x @ dequantize(w).to(x.dtype).t()


def quantize(w: torch.Tensor, precision: str, group: int = DEFAULT_GROUP) -> QuantWeight:
    """Quantise w [N, K] to 'int8' or 'int4'."""
    if precision == "int8":
        return quantize_int8(w)
    if precision == "int4":
        return quantize_int4(w, group)
    raise ConfigError(f"quantize: precision={precision!r}: expected 'int8' or 'int4'")


def quantize_expert(
    params: dict[str, torch.Tensor], precision: str, group: int = DEFAULT_GROUP
) -> dict[str, QuantWeight]:
    """One expert's {gate_up_proj, down_proj} float weights -> quantised weights."""
    return {n: quantize(w, precision, group) for n, w in params.items()}


def is_quantized(params: dict[str, object]) -> bool:
    """True if an expert's weights are QuantWeights."""
    return isinstance(next(iter(params.values())), QuantWeight)


def apply_quantized(
    activate, params: dict[str, QuantWeight], x: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One SwiGLU/GELU/ReLU expert on x [n, D] with quantised weights (`activate` = the bank's)."""
    h = qmm(x, params["gate_up_proj"])
    y = qmm(activate(h), params["down_proj"])
    if out is not None:
        out.copy_(y)
        return out
    return y


def expert_nbytes(shapes: dict[str, tuple[int, ...]], precision: str, itemsize: int = 4,
                  group: int = DEFAULT_GROUP) -> int:  # fmt: skip
    """Bytes of one expert of these [N, K] shapes at `precision` (full: itemsize per weight)."""
    check_precision(precision)
    total = 0
    for shape in shapes.values():
        N, K = int(shape[0]), int(shape[1])
        if precision == "full":
            total += N * K * itemsize
        elif precision == "int8":
            total += N * K + 2 * N
        else:
            total += N * K // 2 + 2 * 2 * N * (K // group)
    return total
