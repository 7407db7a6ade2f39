"""Comparison tables label the scored split by what it is, carry the seed and chance level,
break recall@k down per domain and mark predictors that lose to a baseline (issue 14)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console
from test_predict_model_mismatch import _model

from moelab.cli import main
from moelab.predict import Horizon, make_predictor
from moelab.predict.commands import load_splits
from moelab.predict.evaluate import CompareResult, compare


def _docs(n: int, seed: int) -> list[SimpleNamespace]:
    rng = np.random.default_rng(seed)
    return [
        SimpleNamespace(
            doc_id=f"s{seed}d{i}", domain=["code", "prose"][i % 2],
            token_ids=rng.integers(3, 200, 30).tolist(),
        )
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from moelab.trace.api import trace_model

    tmp = tmp_path_factory.mktemp("labels")
    m0 = _model(tmp, 0)
    out = {}
    for name, docs in (("fit", _docs(12, 0)), ("other", _docs(8, 1)), ("same", _docs(12, 0))):
        trace_model(m0, docs, None, tmp / name, split="train", seq_len=32, progress=False)
        out[name] = tmp / name
    return out


def test_test_trace_of_train_split_is_named_not_called_held_out(stores) -> None:
    _, _, desc, _ = load_splits(stores["fit"], stores["other"], 0.2, 0)
    assert "traced split 'train'" in desc and "held-out" in desc
    _, _, desc, _ = load_splits(stores["fit"], stores["same"], 0.2, 0)
    assert "held-out" not in desc and "in-sample" in desc


def test_compare_outputs_seed_chance_domains_and_baseline_marks(stores, tmp_path) -> None:
    tr, te, desc, _ = load_splits(stores["fit"], stores["other"], 0.2, 0)
    h = Horizon.parse("d=1")
    preds = [make_predictor(n, h, seed=0).fit(tr) for n in ("prior", "prev-layer", "ngram1")]
    res = compare(preds, te, train=tr, split_name=desc, out_dir=tmp_path, show=False, seed=7)
    data = json.loads((tmp_path / "compare.json").read_text())
    held = [r for r in data if not r["in_sample"]]
    assert all(r["seed"] == 7 for r in data)
    assert all(r["chance_recall@k"] == pytest.approx(2 / 4) for r in data)
    assert all(set(r["domains"]) == {"code", "prose"} for r in held)
    assert all(r["trace_split"] == "train" and r["held_out"] for r in held)
    csv = (tmp_path / "compare.csv").read_text().splitlines()
    head = csv[0].split(",")
    assert {"seed", "chance_recall@k", "beats_baselines", "recall@k[domain=code]"} <= set(head)
    buf = io.StringIO()
    res.print(Console(file=buf, width=250))
    text = buf.getvalue()
    assert "chance recall@k (k/E) = 0.500" in text
    assert "recall@k per domain" in text and "train (held-out)" in text
    assert "beats baselines" in text


def test_loser_is_marked() -> None:
    def r(name: str, rec: float) -> dict:
        return {
            "predictor": name, "horizon": "d=1", "scored_on": "x (held-out)", "in_sample": False,
            "overall": {"recall@k": rec, "rows": 10}, "budgets": [], "buckets": {},
        }  # fmt: skip

    rows = CompareResult([r("prior", 0.6), r("prev-layer", 0.5), r("ngram1", 0.55)]).table_rows()
    assert rows[2]["beats_baselines"] == "NO (loses to prior)"
    assert rows[0]["beats_baselines"] == "baseline"
    rows = CompareResult([r("prior", 0.4), r("ngram1", 0.55)]).table_rows()
    assert rows[1]["beats_baselines"] == "yes"


def test_predict_eval_json_has_seed(stores, tmp_path, monkeypatch) -> None:
    pred, out = tmp_path / "p", tmp_path / "eval.json"
    for args in (
        ["predict", "fit", "--train", str(stores["fit"]), "--out", str(pred), "--seed", "3"],
        [
            "predict",
            "eval",
            "--model",
            str(pred),
            "--test",
            str(stores["other"]),
            "--out",
            str(out),
        ],
    ):
        monkeypatch.setattr(sys, "argv", ["moelab", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        assert not exc.value.code
    assert json.loads(out.read_text())["seed"] == 3
