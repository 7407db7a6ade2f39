"""Atomic, resumable training checkpoints (the torchtitan/DCP idea of "everything needed to
continue bit-for-bit", on one machine): model (MoETransformer.save), optimizer, lr scheduler,
every RNG state and the data position, written into a temporary folder that is renamed into
place, then named in `latest` (written atomically). A killed run resumes from the newest
complete checkpoint and reproduces the loss curve of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab._io import atomic_write_json, atomic_write_text, atomic_write_with
from moelab.errors import DataError, ModelError

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Torch (global + data generator), numpy and python RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoints/step-XXXXXXX atomically, point `latest` at it, prune old ones."""
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
        "optimizer": optimizer.state_dict(),
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


def load_checkpoint(
    ckpt: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG in place and return the trainer state dict."""
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
    blob = torch.load(d / OPTIM_FILE, weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"], generator)
    return json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
