"""Part-of-speech roles of experts (Lingua::EN::Tagger when installed, else heuristic classes)."""

from __future__ import annotations

import numpy as np
import pytest
from experts_tiny import tiny_moe

from moelab.experts import roles
from moelab.experts.roles import (
    POS_CLASSES,
    char_classes,
    expert_roles,
    plot_roles,
    tagger_available,
)

TEXT = "The quick brown fox jumps over the lazy dog. He ran quickly and she sang."


def _enc(text: str):
    """Word-piece-ish ids by character offsets: one token per 3 characters."""
    offs = [(i, min(i + 3, len(text))) for i in range(0, len(text), 3)]
    ids = [2 + (sum(map(ord, text[a:b])) % 90) for a, b in offs]
    return ids, offs


@pytest.mark.skipif(not tagger_available()[0], reason="liblingua-en-tagger-perl not installed")
def test_tagger_classes_of_a_sentence() -> None:
    tagged = roles.tag_texts([TEXT, "Two cats sat."])
    assert len(tagged) == 2
    words = dict(tagged[0])
    assert words["fox"] == "nn" and words["quickly"] == "rb" and words["The"] == "det"
    cc = char_classes(TEXT, tagged[0])
    assert POS_CLASSES[cc[TEXT.index("fox")]] == "NOUN"
    assert POS_CLASSES[cc[TEXT.index("lazy") + 2]] == "ADJ"
    assert POS_CLASSES[cc[TEXT.index("jumps")]] in ("VERB", "NOUN")
    assert cc[TEXT.index(" ")] == -1
    assert POS_CLASSES[char_classes("Two cats sat.", tagged[1])[0]] == "NUM"


def _check(res, k: int, E: int) -> None:
    assert res.share.shape == (len(res.classes), 2, E)
    assert np.allclose(res.share.sum(-1), k)  # k slots per token
    assert np.allclose(res.overall.sum(-1), k)
    assert res.counts.sum() > 0 and res.chance == k / E
    # the count-weighted class shares give back the overall usage
    w = res.counts / res.counts.sum()
    assert np.allclose((w[:, None, None] * res.share).sum(0), res.overall)
    assert res.tsne is not None and res.tsne.shape[1] == 2


@pytest.mark.skipif(not tagger_available()[0], reason="liblingua-en-tagger-perl not installed")
def test_roles_on_a_tiny_model(tmp_path) -> None:
    m = tiny_moe(num_experts=4, top_k=2)
    texts = [TEXT * 3, "A red tree and an old house stood by the river. " * 4]
    res = expert_roles(m, _enc, texts, bos=1, seq_len=32, max_tokens=400, tsne_points=120)
    _check(res, 2, 4)
    plot_roles(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_roles_fall_back_to_heuristic_classes(monkeypatch) -> None:
    monkeypatch.setattr(roles, "tagger_available", lambda: (False, "no perl (test)"))
    m = tiny_moe(num_experts=4, top_k=2)
    res = expert_roles(m, _enc, [TEXT * 4], bos=1, seq_len=32, max_tokens=300, tsne_points=80,
                       heuristic_decode=lambda i: "abc" if i % 2 else ".")  # fmt: skip
    assert res.tagger.startswith("heuristic") and res.notes
    assert set(res.classes) <= {"letters", "punctuation"}
    _check(res, 2, 4)
    with pytest.raises(Exception, match="no perl"):
        expert_roles(m, _enc, [TEXT], bos=1)
