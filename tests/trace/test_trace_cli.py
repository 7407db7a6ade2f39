"""`moelab trace` / `moelab trace-export` end to end on a user corpus and a moelab checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from trace_testutil import build_moelab
from typer.testing import CliRunner

from moelab.cli import app


@pytest.fixture
def corpus_and_model(tmp_path: Path) -> tuple[Path, Path]:
    from moelab.data import train_tokenizer

    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta router expert token layer mixture gate sparse dense".split()
    corpus = tmp_path / "corpus.jsonl"
    rows = [
        {"id": i, "domain": ["a", "b"][i % 2], "text": " ".join(rng.choice(words, 40 + 7 * i))}
        for i in range(20)
    ]
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    ckpt = build_moelab(tmp_path)
    train_tokenizer([r["text"] for r in rows], vocab_size=290, out_path=ckpt / "tokenizer.json")
    return corpus, ckpt


def test_cli_trace_resume_and_export(tmp_path: Path, corpus_and_model: tuple[Path, Path]) -> None:
    corpus, ckpt = corpus_and_model
    out = tmp_path / "store"
    args = [
        "trace",
        "--model",
        str(ckpt),
        "--corpus",
        str(corpus),
        "--split",
        "train",
        "--max-tokens",
        "300",
        "--out",
        str(out),
        "--logits",
        "--hidden-layers",
        "1",
        "--hidden-rate",
        "0.25",
        "--seq-len",
        "32",
        "--shard-tokens",
        "64",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "tokens" in res.output and "300" in res.output
    from moelab.trace.store import TraceStore

    st = TraceStore.open(out)
    tr = st.load()
    assert tr.num_tokens == 300 and st.meta.split == "train" and st.meta.domains == ["a", "b"]
    assert st.meta.extra["hidden_layers"] == [1] and tr.logits is not None
    assert tr.is_bos.sum() == len(np.unique(tr.doc_id))
    assert st.meta.command.startswith("moelab trace")
    # rerunning the same command finds the store complete and changes nothing
    before = sorted(p.stat().st_mtime_ns for p in st.shards)
    res2 = CliRunner().invoke(app, args)
    assert res2.exit_code == 0, res2.output
    assert sorted(p.stat().st_mtime_ns for p in TraceStore.open(out).shards) == before
    res3 = CliRunner().invoke(app, ["trace-export", str(out), "--out", str(tmp_path / "eam.npy")])
    assert res3.exit_code == 0, res3.output
    eam = np.load(tmp_path / "eam.npy")
    assert eam.shape == (len(np.unique(tr.doc_id)), 3, 6) and eam[:, 0].sum() == 0  # layer 0 dense
    assert eam.sum() == 300 * 2 * 2


def test_cli_error_names_path(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moelab.cli",
            "trace",
            "--model",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
            "--corpus",
            str(tmp_path / "nocorpus"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "error:" in r.stderr and str(tmp_path / "nocorpus") in r.stderr
