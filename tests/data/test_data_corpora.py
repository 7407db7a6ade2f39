"""Corpora: registry, built-in python-code, user corpora in every format, clear errors."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelab.data import Document, list_corpora, load_corpus
from moelab.data.corpora import BUILTINS, DEFAULT_MIX, chunk_text, html_to_text, strip_gutenberg
from moelab.errors import DataError


def test_registry_lists_every_builtin_with_hint() -> None:
    infos = {c.name: c for c in list_corpora()}
    for name in ["python-code", "shakespeare", "wikipedia", "python-docs", "bible-kjv", "default"]:
        assert name in infos
    for lang in ["en", "fr", "de", "es", "ru", "zh-CN"]:
        info = infos[f"debian-handbook-{lang}"]
        assert info.domain == lang
        assert "debian-handbook" in info.install_hint
    assert infos["python-code"].available and infos["python-code"].size_bytes > 1_000_000
    for c in infos.values():
        assert c.install_hint
        assert (c.size_bytes > 0) == c.available or c.name == "default"
    assert set(DEFAULT_MIX) <= set(BUILTINS)


def test_python_code_rule_and_cap() -> None:
    docs = load_corpus("python-code", max_bytes=60_000, seed=3)
    total = sum(len(d.text.encode()) for d in docs)
    assert 60_000 <= total < 60_000 + 300_000  # stops after the first doc past the cap
    assert all(d.domain == "code" for d in docs)
    assert all(d.doc_id.startswith("python-code/") and d.doc_id.endswith(".py") for d in docs)
    # test folders are excluded by rule
    assert not any(
        "/test/" in d.doc_id or "/tests/" in d.doc_id or "idle_test" in d.doc_id for d in docs
    )
    # reproducible for a seed, different for another seed
    again = load_corpus("python-code", max_bytes=60_000, seed=3)
    assert [d.doc_id for d in again] == [d.doc_id for d in docs]
    other = load_corpus("python-code", max_bytes=60_000, seed=4)
    assert [d.doc_id for d in other] != [d.doc_id for d in docs]


def test_default_mix_uses_available_domains_with_caps(monkeypatch) -> None:
    # only the always-present corpus: the default must still work (optional ones switched off)
    for name in DEFAULT_MIX:
        if name != "python-code":
            monkeypatch.setitem(BUILTINS, name, replace(BUILTINS[name], available=lambda: False))
    docs = load_corpus("default", max_bytes=50_000, seed=0)
    assert {d.domain for d in docs} == {"code"}
    sizes = [len(d.text.encode()) for d in docs]
    assert sum(sizes) >= 50_000 and sum(sizes) - sizes[-1] < 50_000  # stops right after the cap
    info = {c.name: c for c in list_corpora()}
    assert not info["shakespeare"].available and info["default"].available


@pytest.mark.skipif(not BUILTINS["shakespeare"].available(), reason="shakespeare not installed")
def test_shakespeare_optional() -> None:
    docs = load_corpus("shakespeare", max_bytes=20_000)
    assert docs and all(d.domain == "english-drama" for d in docs)
    assert not any("Project Gutenberg" in d.text for d in docs)


def test_strip_gutenberg_and_chunking() -> None:
    text = "Header junk\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody line.\n\nMore.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicense."
    assert strip_gutenberg(text) == "Body line.\n\nMore.\n"
    assert strip_gutenberg("no markers\n") == "no markers\n"
    chunks = chunk_text("a" * 50 + "\n\n" + "b" * 50 + "\n\n" + "c" * 10, 60)
    assert chunks == ["a" * 50 + "\n\n" + "b" * 50, "c" * 10]


def test_html_to_text_skips_navigation() -> None:
    page = (
        '<html><head><title>T</title><style>x{}</style></head><body><div id="banner">Download</div>'
        '<ul class="docnav"><li>Prev</li></ul><div class="section"><h2>1.1 Title</h2>'
        '<div class="para">Hello &amp; <code>apt</code>   world</div><pre>a\n  b</pre></div></body></html>'
    )
    assert html_to_text(page) == "1.1 Title\nHello & apt world\na\nb\n"


def test_user_text_file_folder_jsonl_parquet(tmp_path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("para one\n\npara two\n\npara three\n", encoding="utf-8")
    docs = load_corpus(f, chunk_chars=5)
    assert [d.text for d in docs] == ["para one", "para two", "para three"]
    assert {d.domain for d in docs} == {"notes"} and len({d.doc_id for d in docs}) == 3

    root = tmp_path / "folder"
    (root / "poems").mkdir(parents=True)
    (root / "code").mkdir()
    (root / "poems" / "a.txt").write_text("roses are red", encoding="utf-8")
    (root / "code" / "b.py").write_text("print(1)", encoding="utf-8")
    (root / "top.txt").write_text("top level", encoding="utf-8")
    docs = {d.doc_id: d for d in load_corpus(root)}
    assert docs["poems/a.txt"].domain == "poems" and docs["code/b.py"].domain == "code"
    assert docs["top.txt"].domain == "folder"

    jl = tmp_path / "d.jsonl"
    jl.write_text(
        "\n".join(
            json.dumps(r) for r in [{"body": "x y", "domain": "news", "id": 7}, {"body": "z"}]
        ),
        encoding="utf-8",
    )
    docs = load_corpus(jl, text_column="body")
    assert [(d.doc_id, d.text, d.domain) for d in docs] == [
        ("d/7", "x y", "news"),
        ("d/1", "z", "d"),
    ]
    with pytest.raises(DataError, match="no text column 'text'"):
        load_corpus(jl)

    pqf = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", ""], "domain": ["a", "b", "c"]}), pqf)
    docs = load_corpus(pqf)
    assert [(d.text, d.domain) for d in docs] == [("alpha", "a"), ("beta", "b")]


def test_hf_dataset_dir_without_datasets_gives_install_hint(tmp_path) -> None:
    d = tmp_path / "saved"
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            load_corpus(d)


def test_errors_unknown_empty_unreadable(tmp_path) -> None:
    with pytest.raises(DataError, match="unknown corpus 'no-such-corpus'"):
        load_corpus("no-such-corpus")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(DataError, match="empty"):
        load_corpus(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        load_corpus(binary)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_corpus(bad)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no files"):
        load_corpus(tmp_path / "emptydir")
    if os.geteuid() != 0:  # root can read anything
        locked = tmp_path / "locked.txt"
        locked.write_text("secret")
        locked.chmod(0)
        with pytest.raises(DataError, match="permission"):
            load_corpus(locked)
    with pytest.raises(DataError, match="max_bytes"):
        load_corpus("python-code", max_bytes=0)


def test_document_is_plain_record() -> None:
    d = Document("x", "t", "dom")
    assert (d.doc_id, d.text, d.domain) == ("x", "t", "dom")
