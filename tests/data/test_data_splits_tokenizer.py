"""Document splits (disjoint, reproducible, stratified), BPE tokenizer round trip, packing provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.data import (
    Document,
    TokenStream,
    apply_splits,
    load_splits,
    load_tokenizer,
    pack_blocks,
    prepare_data,
    save_splits,
    special_ids,
    split_documents,
    tokenize_documents,
    train_tokenizer,
)
from moelab.errors import ConfigError, DataError

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls sing about rivers".split()


def make_docs(n: int, domains=("a", "b", "c"), seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    return [
        Document(
            f"doc{i:04d}",
            " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + ".",
            domains[i % len(domains)],
        )
        for i in range(n)
    ]


def test_splits_disjoint_complete_reproducible(tmp_path) -> None:
    docs = make_docs(3000)
    s1 = split_documents(docs, seed=7)
    ids = {k: {d.doc_id for d in v} for k, v in s1.items()}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert not (ids["validation"] & ids["test"])
    assert set().union(*ids.values()) == {d.doc_id for d in docs}
    # fractions 80/10/10 within binomial noise (sd ~ 0.55% at n=3000), in every domain
    for k, f in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert abs(len(s1[k]) / 3000 - f) < 0.025
        for dom in "abc":
            assert abs(sum(d.domain == dom for d in s1[k]) / 1000 - f) < 0.04
    # reproducible, independent of input order, seed-dependent
    s2 = split_documents(list(reversed(docs)), seed=7)
    assert {k: {d.doc_id for d in v} for k, v in s2.items()} == ids
    s3 = split_documents(docs, seed=8)
    assert {d.doc_id for d in s3["test"]} != ids["test"]
    # a document keeps its split in any subset of the corpus (e.g. a smaller byte cap later)
    sub = split_documents(docs[::7], seed=7)
    for k, v in sub.items():
        assert {d.doc_id for d in v} <= ids[k]
    # stored beside the data and re-applied exactly
    save_splits(s1, tmp_path / "splits.json", seed=7)
    back = apply_splits(docs, load_splits(tmp_path / "splits.json"))
    assert {k: [d.doc_id for d in v] for k, v in back.items()} == {
        k: [d.doc_id for d in v] for k, v in s1.items()
    }


def test_small_domains_still_reach_every_split() -> None:
    for n in (3, 4, 5, 8):
        s = split_documents(make_docs(n, domains=("x",)))
        assert all(len(s[k]) >= 1 for k in ("train", "validation", "test")), n
        assert sum(len(v) for v in s.values()) == n


def test_split_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="fractions"):
        split_documents(make_docs(10), fractions=(0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="empty"):
        split_documents([])
    with pytest.raises(DataError, match="duplicate document id 'same'"):
        split_documents([Document("same", "a", "d"), Document("same", "b", "d")])
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "nope.json")
    with pytest.raises(DataError, match="not in the corpus"):
        apply_splits(make_docs(5), {"train": ["missing"], "validation": [], "test": []})


def test_tokenizer_round_trip_and_specials(tmp_path) -> None:
    docs = make_docs(100) + [
        Document("ru", "Привет, мир! Как дела? " * 20, "ru"),
        Document("zh", "中文测试，你好世界。" * 20, "zh"),
    ]
    tok = train_tokenizer(docs, vocab_size=400, out_path=tmp_path / "tokenizer.json")
    assert 256 + 5 < tok.get_vocab_size() <= 400  # fewer when merges run out
    sp = special_ids(tok)
    assert (sp.pad, sp.bos, sp.eos, sp.unk, sp.mask) == (0, 1, 2, 3, 4)
    again = load_tokenizer(tmp_path / "tokenizer.json")
    for text in [
        "the lazy dog",
        "Привет, мир!",
        "中文测试",
        "unseen: Zebra ∑ 🙂 \t\n  tabs",
        "def f(x):\n    return x",
    ]:
        ids = again.encode(text, add_special_tokens=False).ids
        assert again.decode(ids) == text
        assert tok.encode(text, add_special_tokens=False).ids == ids
    # merges learned: a frequent word is one token, not bytes
    assert len(tok.encode("quick", add_special_tokens=False).ids) == 1
    # a folder with tokenizer.json loads too (HF tokenizer folder layout)
    assert load_tokenizer(tmp_path).get_vocab_size() == tok.get_vocab_size()
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(docs, vocab_size=100)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(DataError, match="cannot be read"):
        load_tokenizer(tmp_path / "bad.json")


def test_packing_keeps_doc_and_position(tmp_path) -> None:
    docs = make_docs(30)
    tok = train_tokenizer(docs, vocab_size=300)
    stream = tokenize_documents(docs, tok, domains=["a", "b", "c"])
    sp = special_ids(tok)
    # every document starts with <bos> at position 0 and positions count up within it
    starts = np.flatnonzero(stream.pos == 0)
    assert len(starts) == len(docs)
    assert (stream.ids[starts] == sp.bos).all()
    for i, d in enumerate(docs):
        sel = stream.doc == i
        assert (stream.pos[sel] == np.arange(sel.sum())).all()
        assert tok.decode(stream.ids[sel][1:].tolist()) == d.text
        assert (stream.domain[sel] == "abc".index(d.domain)).all()
    blocks = pack_blocks(stream, seq_len=16)
    assert blocks.input_ids.shape == (len(stream) // 16, 16)
    flat = blocks.input_ids.reshape(-1).numpy()
    n = flat.shape[0]
    assert (flat == stream.ids[:n]).all()
    assert (blocks.doc.reshape(-1).numpy() == stream.doc[:n]).all()
    assert (blocks.pos.reshape(-1).numpy() == stream.pos[:n]).all()
    assert blocks.doc_ids[int(blocks.doc[3, 5])] == docs[int(stream.doc[3 * 16 + 5])].doc_id
    # a capped sample is spread over the whole stream (every domain), not its first blocks
    few = pack_blocks(stream, seq_len=16, max_blocks=5)
    assert len(few) == 5
    picked = np.linspace(0, len(blocks) - 1, 5).round().astype(int)
    assert torch.equal(few.input_ids, blocks.input_ids[picked])
    assert torch.equal(few.pos, blocks.pos[picked])
    assert few.doc[-1, -1] == blocks.doc[-1, -1]
    # save/load round trip
    stream.save(tmp_path / "s.npz")
    back = TokenStream.load(tmp_path / "s.npz")
    assert (
        (back.ids == stream.ids).all()
        and back.doc_ids == stream.doc_ids
        and back.domains == stream.domains
    )
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(stream, seq_len=10**7)
    with pytest.raises(DataError, match="not in the domain table"):
        tokenize_documents(docs, tok, domains=["a"])


def _word(i: int) -> str:
    return f"qz{chr(97 + i % 26)}{chr(97 + i // 26)}v"


def test_prepare_data_trains_tokenizer_on_train_only(tmp_path) -> None:
    docs_dir = tmp_path / "corpus"
    (docs_dir / "x").mkdir(parents=True)
    for i, d in enumerate(make_docs(40)):
        # each document repeats a word of its own: it becomes one token only if trained on
        text = d.text + (" " + _word(i)) * 12
        (docs_dir / "x" / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    p = prepare_data(str(docs_dir), tmp_path / "data", vocab_size=2000, seed=1)
    assert sum(p.info["documents"].values()) == 40
    assert all(n >= 1 for n in p.info["documents"].values())
    assert set(p.streams) == {"train", "validation", "test"}
    ids = load_splits(tmp_path / "data" / "splits.json")
    assert p.streams["validation"].doc_ids == ids["validation"]
    for split, names in ids.items():
        for name in names:
            i = int(name.split("/")[-1][:3])
            n_tok = len(p.tokenizer.encode(" " + _word(i), add_special_tokens=False).ids)
            assert (n_tok == 1) == (split == "train"), (split, name, n_tok)
    # reused, not recomputed, on a second call; a different corpus in the same folder is refused
    again = prepare_data(str(docs_dir), tmp_path / "data", vocab_size=2000, seed=1)
    assert (again.streams["train"].ids == p.streams["train"].ids).all()
    with pytest.raises(DataError, match="already holds data"):
        prepare_data("python-code", tmp_path / "data", seed=1)
