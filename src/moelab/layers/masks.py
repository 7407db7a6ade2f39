"""Token masks passed by explicit name, and the refusal of masks that look inverted.

Frameworks disagree on what True means: Megatron-Core's `padding_mask` is True at padding
(`z_loss_func`, `compute_routing_scores_for_aux_loss` invert it), transformers'
`attention_mask` is 1 at real tokens. Routers, `MoEBlock` and the losses therefore take
either `padding_mask=` (True = padding) or `attention_mask=` (1 = real token) by keyword,
and refuse a mask that looks like the other convention was passed:

- every token is padding (an all-valid batch passed with the opposite convention), or
- with `padding_side="right"` (the default: real tokens first, padding at the end of a
  row), every row starts with padding (a right-padded batch passed inverted).

Left-padded batches (batched generation) pass `padding_side="left"`, which skips the
second check. The positional `mask` argument (True = real token) is moelab's internal
form: it is taken as is, without these checks, so existing callers keep today's behaviour.
"""

from __future__ import annotations

import torch

from moelab.errors import InputError

PADDING_SIDES = ("right", "left")


def _as_bool(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """Bool view of a 0/1 (bool, int or float) mask, refusing other values."""
    if t.dtype == torch.bool:
        return t
    if not bool(((t == 0) | (t == 1)).all()):
        raise InputError(f"{where}: {name} must be bool or 0/1 valued, got other values")
    return t != 0


def resolve_mask(
    num_tokens: int,
    where: str,
    mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    rows: int | None = None,
    padding_side: str = "right",
) -> torch.Tensor | None:
    """Flat [T] bool mask, True = real token, from exactly one of mask / padding_mask /
    attention_mask (or None); refuses an explicit mask that looks inverted (module docstring).

    `rows`: number of batch rows (sequences) of the flattened tokens, used for the
    "padding at the start of every row" check when the mask itself is flat; a 2-D mask
    [B, S] gives its own rows.
    """
    given = [
        n
        for n, v in (
            ("mask", mask),
            ("padding_mask", padding_mask),
            ("attention_mask", attention_mask),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise InputError(f"{where}: pass only one of {given} (they are the same mask)")
    if not given:
        return None
    name = given[0]
    t = mask if mask is not None else padding_mask if padding_mask is not None else attention_mask
    if not isinstance(t, torch.Tensor) or t.numel() != num_tokens:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(
            f"{where}: {name} must have {num_tokens} elements (one per routed token), got {shape}"
        )
    if name == "mask":
        return t.reshape(-1).to(torch.bool)
    if padding_side not in PADDING_SIDES:
        raise InputError(f"{where}: padding_side={padding_side!r}; expected one of {PADDING_SIDES}")
    b = _as_bool(t, name, where)
    valid = ~b if name == "padding_mask" else b
    convention = (
        "padding_mask is True at PADDING (Megatron-Core)"
        if name == "padding_mask"
        else "attention_mask is 1 at REAL tokens (transformers)"
    )
    if not bool(valid.any()):
        raise InputError(
            f"{where}: {name} marks every token as padding; this looks inverted ({convention}). "
            "Pass the mask under its own convention's name."
        )
    if padding_side == "right":
        if t.dim() >= 2:
            grid = valid.reshape(t.shape[0], -1)
        else:
            r = rows if rows is not None and rows >= 1 and num_tokens % rows == 0 else 1
            grid = valid.reshape(r, -1)
        if grid.shape[1] > 0 and not bool(grid[:, 0].any()):
            raise InputError(
                f"{where}: {name} puts padding at the start of every row, but right padding "
                f"(real tokens first) is expected; this looks inverted ({convention}). For a "
                "left-padded batch pass padding_side='left'."
            )
    return valid.reshape(-1)
