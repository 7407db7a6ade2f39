"""Resume after a kill reproduces the uninterrupted loss curve exactly; MLM run + topic histograms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moelab.models import MoETransformer
from moelab.train import load_train_config, train
from moelab.train.checkpoint import latest_checkpoint


class Killed(Exception):
    """Stands in for SIGKILL: leaves the loop without any cleanup or final checkpoint."""


def test_resume_after_kill_reproduces_curve(tiny, tmp_path: Path) -> None:
    full = train(load_train_config(**{**tiny, "out_dir": str(tmp_path / "full")}))
    cfg = load_train_config(**{**tiny, "out_dir": str(tmp_path / "killed")})

    def kill_at_7(step: int, loss: float) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_7)
    assert latest_checkpoint(tmp_path / "killed").name == "step-0000004"
    resumed = train(cfg)
    assert resumed.resumed_from == 4
    assert resumed.losses == full.losses  # bit-for-bit equal curve
    assert [e["val_loss"] for e in resumed.evals] == [e["val_loss"] for e in full.evals]
    a = MoETransformer.load(full.model_dir).state_dict()
    b = MoETransformer.load(resumed.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log has no duplicate steps from the redone part
    lines = [
        json.loads(ln) for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [ln["step"] for ln in lines if "lm_loss" in ln] == [3, 6, 9, 12]
    assert [ln["step"] for ln in lines if "eval" in ln] == [6, 12]


def test_mlm_run_writes_topic_histograms(tiny) -> None:
    r = train(load_train_config(**{**tiny, "mode": "mlm", "max_steps": 6}))
    assert r.steps == 6 and all(l == l for l in r.losses)  # noqa: E741 (finite, not NaN)
    topics = json.loads((r.run_dir / "topics" / "topics.json").read_text())
    assert topics["domains"] == ["code"] and topics["layers"] == [0, 1]
    for per_layer in topics["share"][0]:
        assert sum(per_layer) == pytest.approx(1.0)
    png = (r.run_dir / "topics" / "topic_histograms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
