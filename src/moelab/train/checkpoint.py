"""Atomic, resumable training checkpoints (the torchtitan/DCP idea of "everything needed to
continue bit-for-bit", on one machine): model (MoETransformer.save), optimizer, lr scheduler,
every RNG state and the data position, written into a temporary folder that is renamed into
place, then named in `latest` (written atomically). A killed run resumes from the newest
complete checkpoint and reproduces the loss curve of an uninterrupted run.

optimizer.pt holds only tensors and plain Python values (the numpy RNG state is stored as a
tensor, not a pickled ndarray), so it is read with `torch.load(weights_only=True)`: a crafted
run folder cannot make a resume execute code (pickle's `__reduce__`), it is refused instead.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab._io import atomic_write_json, atomic_write_text, atomic_write_with
from moelab.errors import DataError, ModelError

# Checkpoints written before the numpy state was stored as a tensor hold one pickled ndarray;
# reading them allows exactly numpy's plain-array reconstruction, nothing else.
_LEGACY_NUMPY_GLOBALS: list[Any] = [
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
]

__all__ = [
    "save_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "load_training_state",
    "rng_state",
    "set_rng_state",
]

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


def _numpy_state() -> dict[str, Any]:
    """numpy's global MT19937 state as tensors and plain values (loadable with weights_only)."""
    st = np.random.get_state(legacy=False)
    return {
        "bit_generator": st["bit_generator"],
        "key": torch.from_numpy(st["state"]["key"].astype(np.int64)),
        "pos": int(st["state"]["pos"]),
        "has_gauss": int(st["has_gauss"]),
        "gauss": float(st["gauss"]),
    }


def _set_numpy_state(st: Any) -> None:
    """Restore `_numpy_state` (or the legacy tuple of `np.random.get_state()`)."""
    if isinstance(st, dict):
        key = st["key"].numpy().astype(np.uint32)
        np.random.set_state(
            {
                "bit_generator": st["bit_generator"],
                "state": {"key": key, "pos": st["pos"]},
                "has_gauss": st["has_gauss"],
                "gauss": st["gauss"],
            }
        )
    else:
        np.random.set_state(st)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Torch (global + data generator), numpy and python RNG states (tensors and plain values)."""
    return {
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    _set_numpy_state(state["numpy"])
    random.setstate(state["python"])


def _load_state_blob(path: Path) -> dict[str, Any]:
    """Read optimizer.pt with the weights-only unpickler; refuse anything that is not plain data."""
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # "pickle protocol N" notes on crafted files
            blob = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise DataError(
            f"{path}: refusing to load: it holds objects other than tensors and plain values"
            f" ({why or 'not a weights-only torch file'}); unpickling them could run code."
            " moelab writes optimizer.pt with tensors and plain values only, so this file was not"
            " written by moelab or has been tampered with. Delete this checkpoint folder"
            " (or start over with --no-resume)."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(
            f"{path}: unreadable optimizer/scheduler/RNG state ({exc}); delete this checkpoint"
            " folder to resume from an older one, or start over with --no-resume"
        ) from None
    missing = (
        [k for k in ("optimizer", "scheduler", "rng") if k not in blob]
        if isinstance(blob, dict)
        else ["optimizer", "scheduler", "rng"]
    )
    if missing:
        raise DataError(
            f"{path}: not a moelab training state (missing {', '.join(missing)}; expected a dict"
            " with optimizer, scheduler and rng); delete this checkpoint folder"
        )
    return blob


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    trainer_state: dict[str, Any],
    keep: int = 2,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step-XXXXXXX atomically, point `latest` at it, prune old ones.

    `optimizer_state` replaces `optimizer.state_dict()` (expert parallelism saves the state
    gathered into the single-process layout)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save(tmp)  # type: ignore[attr-defined]
    blob = {
        "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(generator),
    }
    atomic_write_with(tmp / OPTIM_FILE, lambda p: torch.save(blob, p))
    atomic_write_json(tmp / STATE_FILE, {**trainer_state, "step": step})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name + "\n")
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(d: Path) -> bool:
    return all(
        (d / f).is_file() for f in (STATE_FILE, OPTIM_FILE, "model.safetensors", "config.json")
    )


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """Newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if d.is_dir() and _complete(d):
            return d
    for d in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        if _complete(d):
            return d
    return None


def load_model_weights(ckpt: str | os.PathLike[str], model: torch.nn.Module) -> None:
    """Load a checkpoint's model.safetensors into `model` (strict)."""
    from safetensors.torch import load_model

    d = Path(ckpt)
    if not _complete(d):
        raise DataError(
            f"checkpoint {d} is incomplete (needs {STATE_FILE}, {OPTIM_FILE}, model files)"
        )
    try:
        load_model(model, str(d / "model.safetensors"), strict=True)
    except (RuntimeError, OSError) as exc:
        raise ModelError(f"checkpoint {d} does not match the configured model: {exc}") from None


def load_training_state(
    ckpt: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Restore optimizer/scheduler/RNG (the optimizer state passed through `transform` first,
    e.g. sliced to this process's experts) and return the trainer state dict."""
    d = Path(ckpt)
    blob = _load_state_blob(d / OPTIM_FILE)
    try:
        opt_state = transform(blob["optimizer"]) if transform is not None else blob["optimizer"]
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"], generator)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise DataError(
            f"{d / OPTIM_FILE}: optimizer/scheduler/RNG state does not fit this run ({exc!r});"
            " delete this checkpoint folder or start over with --no-resume"
        ) from None
    return json.loads((d / STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(
    ckpt: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG in place and return the trainer state dict."""
    load_model_weights(ckpt, model)
    return load_training_state(ckpt, optimizer, scheduler, generator)
