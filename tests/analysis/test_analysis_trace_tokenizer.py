"""`moelab analyze` decodes tokens with the trace's own tokenizer: `moelab trace` copies
tokenizer.json into the store; without one, analyze says so once (issue 14)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "trace"))

WORDS = "alpha beta gamma delta router expert token layer mixture gate sparse dense".split()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store traced from text with a BPE tokenizer, store traced from pre-tokenized ids)."""
    from types import SimpleNamespace

    from trace_testutil import build_moelab, make_docs

    from moelab.data import Document, train_tokenizer
    from moelab.trace import trace_model

    tmp = tmp_path_factory.mktemp("tok")
    texts = [" ".join(WORDS[i:] + WORDS[:i]) * 2 for i in range(4)]
    tok = train_tokenizer(texts, vocab_size=290, out_path=tmp / "tok.json")
    ckpt = build_moelab(tmp)
    docs = [Document(doc_id=str(i), text=t, domain="x") for i, t in enumerate(texts)]
    a = trace_model(ckpt, docs, tok, tmp / "a", seq_len=32, progress=False).path
    pre = [SimpleNamespace(**vars(d)) for d in make_docs(3)]
    b = trace_model(ckpt, pre, None, tmp / "b", seq_len=32, progress=False).path
    return Path(a), Path(b)


def test_trace_copies_tokenizer_and_analyze_loads_it(traced) -> None:
    from moelab.analysis.commands import trace_tokenizer
    from moelab.trace.store import TraceStore

    a, _ = traced
    assert (a / "tokenizer.json").is_file()
    meta = TraceStore.open(a).meta
    assert meta.extra["tokenizer_file"] == "tokenizer.json"
    tok, note = trace_tokenizer(a, meta, None)
    assert tok is not None and note == ""
    assert tok.decode(tok.encode("router expert").ids).strip() == "router expert"


def test_no_tokenizer_is_said_once(traced, tmp_path: Path, capsys) -> None:
    from moelab.cli import main

    _, b = traced
    sys.argv = ["moelab", "analyze", str(b), "--out", str(tmp_path / "an"), "--no-figures",
                "--no-projections"]  # fmt: skip
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("no tokenizer could be loaded for this trace") == 1, text
    assert "--tokenizer" in text
