"""Checkpoint state is read without unpickling code: a crafted optimizer.pt is refused, and a
checkpoint (new or legacy format) restores optimizer, scheduler and every RNG exactly."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.errors import DataError
from moelab.models import MoETransformer, MoETransformerConfig
from moelab.train import load_train_config, train
from moelab.train.checkpoint import OPTIM_FILE, load_checkpoint, rng_state, save_checkpoint
from moelab.train.schedule import warmup_cosine


class _WritesMarker:
    """Unpickling this calls os.system / open: what a crafted run folder would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _setup() -> tuple[MoETransformer, torch.optim.Optimizer, object, torch.Generator]:
    torch.manual_seed(0)
    cfg = MoETransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=16)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = warmup_cosine(opt, 2, 10)
    gen = torch.Generator().manual_seed(3)
    return model, opt, sched, gen


def _step(model: MoETransformer, opt: torch.optim.Optimizer, sched: object) -> None:
    ids = torch.randint(0, 64, (2, 8))
    model(ids).logits.float().mean().backward()
    opt.step()
    sched.step()  # type: ignore[attr-defined]
    opt.zero_grad()


def _checkpoint(tmp_path: Path) -> Path:
    model, opt, sched, gen = _setup()
    _step(model, opt, sched)
    return save_checkpoint(tmp_path / "run", 1, model, opt, sched, gen, {"seen": 1})


@pytest.mark.parametrize("fmt", ["torch_save", "raw_pickle"])
def test_crafted_optimizer_file_is_refused_and_runs_nothing(tmp_path: Path, fmt: str) -> None:
    ckpt = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    payload = {"optimizer": _WritesMarker(marker), "scheduler": {}, "rng": {}}
    if fmt == "torch_save":
        torch.save(payload, ckpt / OPTIM_FILE)
    else:
        (ckpt / OPTIM_FILE).write_bytes(pickle.dumps(payload, protocol=2))
    model, opt, sched, gen = _setup()
    with pytest.raises(DataError) as err:
        load_checkpoint(ckpt, model, opt, sched, gen)  # type: ignore[arg-type]
    msg = str(err.value)
    assert str(ckpt / OPTIM_FILE) in msg
    assert "refusing to load" in msg and "could run code" in msg
    assert "system" in msg  # names the global it refused (posix.system / nt.system)
    assert "Delete this checkpoint folder" in msg
    assert not marker.exists()


def test_crafted_optimizer_file_is_refused_on_resume(tiny, tmp_path: Path) -> None:
    """Through train(resume=True), the path every `moelab train` takes by default."""
    cfg = load_train_config(**{**tiny, "max_steps": 4, "checkpoint_every": 4, "eval_every": 4})
    r = train(cfg)
    ckpt = r.run_dir / "checkpoints" / "step-0000004"
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _WritesMarker(marker)}, ckpt / OPTIM_FILE)
    cfg2 = load_train_config(**{**tiny, "max_steps": 8, "checkpoint_every": 4, "eval_every": 4})
    with pytest.raises(DataError, match="refusing to load"):
        train(cfg2)
    assert not marker.exists()


def test_optimizer_file_not_a_training_state(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    torch.save({"optimizer": {}}, ckpt / OPTIM_FILE)
    model, opt, sched, gen = _setup()
    with pytest.raises(DataError, match="missing scheduler, rng"):
        load_checkpoint(ckpt, model, opt, sched, gen)  # type: ignore[arg-type]


def test_saved_state_is_weights_only_and_restores_exactly(tmp_path: Path) -> None:
    model, opt, sched, gen = _setup()
    _step(model, opt, sched)
    np.random.seed(5)
    random.seed(6)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    ckpt = save_checkpoint(tmp_path / "run", 1, model, opt, sched, gen, {"seen": 1})
    torch.load(ckpt / OPTIM_FILE, weights_only=True)  # plain data only: no allow-list needed
    expect = (
        np.random.normal(size=4),
        random.random(),
        torch.rand(3),
        torch.rand(3, generator=gen),
    )
    _step(model, opt, sched)
    expect_params = [p.detach().clone() for p in model.parameters()]
    expect_lr = sched.get_last_lr()  # type: ignore[attr-defined]

    np.random.seed(99)
    random.seed(99)
    m2, o2, s2, g2 = _setup()
    assert load_checkpoint(ckpt, m2, o2, s2, g2)["seen"] == 1  # type: ignore[arg-type]
    got = (np.random.normal(size=4), random.random(), torch.rand(3), torch.rand(3, generator=g2))
    assert np.array_equal(got[0], expect[0]) and got[1] == expect[1]
    assert torch.equal(got[2], expect[2]) and torch.equal(got[3], expect[3])
    _step(m2, o2, s2)
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), expect_params, strict=True))
    assert s2.get_last_lr() == expect_lr  # type: ignore[attr-defined]


def test_legacy_checkpoint_with_numpy_array_still_resumes(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    blob = torch.load(ckpt / OPTIM_FILE, weights_only=True)
    np.random.seed(7)
    legacy = np.random.get_state()  # the tuple with an ndarray older moelab pickled
    blob["rng"]["numpy"] = legacy
    torch.save(blob, ckpt / OPTIM_FILE)
    expect = np.random.random(3)
    np.random.seed(0)
    model, opt, sched, gen = _setup()
    load_checkpoint(ckpt, model, opt, sched, gen)  # type: ignore[arg-type]
    assert np.array_equal(np.random.random(3), expect)


def test_rng_state_holds_no_numpy_arrays() -> None:
    st = rng_state(torch.Generator())

    def walk(x: object) -> None:
        assert not isinstance(x, np.ndarray)
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(st)
