"""A predictor fitted on one model's trace is never scored on another model's trace (the router
fingerprints in meta.json differ): evaluate/compare and the CLI refuse, naming both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moelab.errors import PredictorError
from moelab.predict import Horizon, NGramPredictor, compare, evaluate
from moelab.trace.store import TraceStore


def _docs(n: int, seed: int) -> list[SimpleNamespace]:
    rng = np.random.default_rng(seed)
    return [
        SimpleNamespace(doc_id=f"d{i}", domain="x", token_ids=rng.integers(3, 200, 30).tolist())
        for i in range(n)
    ]


def _model(tmp: Path, seed: int) -> Path:
    import torch

    from moelab.layers.config import MoEConfig
    from moelab.models.config import MoETransformerConfig
    from moelab.models.transformer import MoETransformer

    cfg = MoETransformerConfig(
        vocab_size=200, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=64,
        moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2),
    )  # fmt: skip
    model = MoETransformer(cfg, seed=seed)
    with torch.no_grad():
        for b in model.blocks:
            b.ffn.router.gate.weight.normal_(0, 0.5)
    return model.save(tmp / f"model{seed}")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a: model 0 on docs; a2: model 0 on other docs; b: model 1 on the same docs as a."""
    from moelab.trace.api import trace_model

    tmp = tmp_path_factory.mktemp("mismatch")
    m0, m1 = _model(tmp, 0), _model(tmp, 1)
    kw = dict(seq_len=32, progress=False)
    out = {}
    for name, model, docs in (
        ("a", m0, _docs(12, 0)),
        ("a2", m0, _docs(6, 1)),
        ("b", m1, _docs(12, 0)),
    ):
        trace_model(model, docs, None, tmp / name, **kw)
        out[name] = tmp / name
    return out


def _fp(path: Path) -> str:
    fp = TraceStore.open(path).meta.model_fingerprint
    assert fp
    return fp


def test_fingerprints_identify_the_model(stores: dict[str, Path]) -> None:
    assert _fp(stores["a"]) == _fp(stores["a2"]) != _fp(stores["b"])


def test_evaluate_refuses_other_models_trace(stores: dict[str, Path]) -> None:
    a, a2, b = (TraceStore.open(stores[k]).load() for k in ("a", "a2", "b"))
    p = NGramPredictor(Horizon(layers_ahead=1)).fit(a)
    assert p.fit_info["model_fingerprint"] == _fp(stores["a"])
    assert evaluate(p, a2, measure_cost=False)["overall"]["rows"] > 0  # same model: fine
    with pytest.raises(PredictorError) as err:
        evaluate(p, b, measure_cost=False)
    msg = str(err.value)
    assert _fp(stores["a"]) in msg and _fp(stores["b"]) in msg
    assert "router fingerprint" in msg and "chance-level" in msg
    with pytest.raises(PredictorError, match="the train trace comes from model"):
        compare([p], b, train=a, show=False)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moelab.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_eval_and_compare_refuse_other_model(stores: dict[str, Path], tmp_path: Path) -> None:
    fa, fb = _fp(stores["a"]), _fp(stores["b"])
    r = _cli("predict", "fit", "--train", str(stores["a"]), "--predictor", "ngram1",
             "--out", str(tmp_path / "ng"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    ev = tmp_path / "ev.json"
    r = _cli("predict", "eval", "--model", str(tmp_path / "ng"), "--test", str(stores["b"]),
             "--out", str(ev))  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert fa in r.stderr and fb in r.stderr and f"--test trace {stores['b']}" in r.stderr
    assert not ev.exists()
    # the same model's other trace is accepted
    r = _cli("predict", "eval", "--model", str(tmp_path / "ng"), "--test", str(stores["a2"]),
             "--out", str(ev))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert ev.is_file()
    cmp = tmp_path / "cmp"
    r = _cli("predict", "compare", "--train", str(stores["a"]), "--test", str(stores["b"]),
             "--predictors", "prior", "--horizons", "d=1", "--out", str(cmp))  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert f"--train trace {stores['a']}" in r.stderr and f"--test trace {stores['b']}" in r.stderr
    assert fa in r.stderr and fb in r.stderr
    assert not cmp.exists()
