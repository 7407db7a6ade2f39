"""`moelab trace` refuses options that would trace nothing (exit 2, one line, no traceback,
nothing written); `--split all`, `--text-column`, empty splits and a missing model path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from trace_testutil import build_moelab

from moelab.cli import main
from moelab.data import Document, split_documents

WORDS = "alpha beta gamma delta router expert token layer mixture gate sparse dense".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(2-document JSONL corpus, moelab checkpoint with tokenizer, the two texts)."""
    from moelab.data import train_tokenizer

    tmp = tmp_path_factory.mktemp("cli_validation")
    texts = [" ".join(WORDS[i:] + WORDS[:i]) * 3 for i in range(2)]
    corpus = tmp / "two.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)))
    ckpt = build_moelab(tmp)
    train_tokenizer(texts, vocab_size=290, out_path=ckpt / "tokenizer.json")
    return corpus, ckpt, texts


def run(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch) -> tuple[int, str]:
    """Run the real entry point (moelab.cli.main) and return (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["moelab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), cap.out + cap.err


def _refused(code: int, output: str, out: Path, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for n in needles:
        assert n in output, (n, output)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "want"),
    [
        ("--seq-len", "-4", "expected an integer >= 1 (tokens)"),
        ("--seq-len", "0", "expected an integer >= 1 (tokens)"),
        ("--max-tokens", "0", "expected an integer >= 1"),
        ("--max-tokens", "-10", "expected an integer >= 1"),
        ("--batch-size", "0", "expected an integer >= 1"),
        ("--shard-tokens", "0", "expected an integer >= 1"),
        ("--hidden-rate", "1.5", "expected a fraction in [0, 1]"),
        ("--max-bytes", "0", "expected an integer >= 1 (bytes)"),
        ("--logits-dtype", "bf16", "expected float16 or float32"),
    ],
)
def test_bad_numbers_are_refused(setup, tmp_path, capsys, monkeypatch, flag, value, want) -> None:
    corpus, ckpt, _ = setup
    out = tmp_path / "store"
    args = ["trace", "--model", str(ckpt), "--corpus", str(corpus), "--split", "all"]
    code, output = run([*args, "--out", str(out), flag, value], capsys, monkeypatch)
    _refused(code, output, out, f"{flag} {value}", want)


def test_empty_split_is_refused_and_all_traces_everything(
    setup, tmp_path, capsys, monkeypatch
) -> None:
    corpus, ckpt, texts = setup
    docs = [Document(doc_id=str(i), text=t, domain="two") for i, t in enumerate(texts)]
    parts = split_documents(docs, seed=0)
    empty = next(s for s in ("test", "validation", "train") if not parts[s])
    sizes = ", ".join(f"{k} {len(v)}" for k, v in parts.items())
    out = tmp_path / "store"
    base = ["trace", "--model", str(ckpt), "--corpus", str(corpus), "--out", str(out)]
    code, output = run([*base, "--split", empty], capsys, monkeypatch)
    _refused(code, output, out, f"--split {empty}: selects no documents", "has 2 document(s)")
    assert sizes in output and "--split all" in output
    if empty == "test":  # the default split is the one that was empty
        code, output = run(base, capsys, monkeypatch)
        _refused(code, output, out, "--split test: selects no documents")
    code, output = run([*base, "--split", "all", "--seq-len", "32"], capsys, monkeypatch)
    assert code == 0, output
    from moelab.trace.store import TraceStore

    st = TraceStore.open(out)
    assert st.meta.split == "all" and st.meta.extra["run"]["num_docs"] == 2
    assert st.num_tokens == st.meta.extra["run"]["total_tokens"] > 0
    code, output = run([*base, "--split", "everything"], capsys, monkeypatch)
    assert code == 2 and "train, validation, test, all" in output


def test_text_column_option(setup, tmp_path, capsys, monkeypatch) -> None:
    _, ckpt, texts = setup
    corpus = tmp_path / "body.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)))
    out = tmp_path / "store"
    base = ["trace", "--model", str(ckpt), "--corpus", str(corpus), "--split", "all"]
    code, output = run([*base, "--out", str(out)], capsys, monkeypatch)
    _refused(code, output, out, "no text column 'text'", "pass --text-column NAME")
    code, output = run(
        [*base, "--out", str(out), "--text-column", "body", "--seq-len", "32"], capsys, monkeypatch
    )
    assert code == 0, output
    assert (out / "done-r000.json").is_file()


def test_missing_model_path(setup, tmp_path, capsys, monkeypatch) -> None:
    corpus, _, _ = setup
    out = tmp_path / "store"
    missing = tmp_path / "nonexistent"
    code, output = run(
        [
            "trace",
            "--model",
            str(missing),
            "--corpus",
            str(corpus),
            "--split",
            "all",
            "--out",
            str(out),
        ],
        capsys,
        monkeypatch,
    )
    _refused(code, output, out, f"--model {missing}: model path does not exist")
    assert "no tokenizer found" not in output


def test_api_refuses_bad_numbers_and_empty_input(setup, tmp_path) -> None:
    from moelab.errors import ConfigError, DataError
    from moelab.trace.api import trace_model

    _, ckpt, _ = setup
    out = tmp_path / "store"
    with pytest.raises(ConfigError, match="--seq-len 0"):
        trace_model(ckpt, [], None, out, seq_len=0, progress=False)
    with pytest.raises(ConfigError, match="--max-tokens -10"):
        trace_model(ckpt, [], None, out, max_tokens=-10, progress=False)
    with pytest.raises(DataError, match="nothing to trace: the 0 document"):
        trace_model(ckpt, [], lambda t: [], out, progress=False)
    assert not out.exists()
