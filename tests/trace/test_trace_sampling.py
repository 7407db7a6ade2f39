"""A capped trace samples documents round-robin by domain, not in corpus order (issue 14)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from trace_testutil import build_moelab

from moelab.data.sampling import interleave_by_domain
from moelab.trace import trace_model


def test_interleave_by_domain_round_robin_and_seeded() -> None:
    docs = [SimpleNamespace(doc_id=i, domain="code" if i < 6 else "prose") for i in range(9)]
    out = interleave_by_domain(docs, seed=3)
    assert [d.domain for d in out[:6]] == ["code", "prose"] * 3
    assert sorted(d.doc_id for d in out) == list(range(9))
    assert [d.doc_id for d in interleave_by_domain(docs, seed=3)] == [d.doc_id for d in out]
    assert [d.doc_id for d in interleave_by_domain(docs, seed=4)] != [d.doc_id for d in out]


def test_capped_trace_covers_both_domains(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # corpus order: every code document first (as a train split of a code-heavy corpus)
    docs = [
        SimpleNamespace(
            doc_id=f"d{i}",
            domain="code" if i < 20 else "prose",
            token_ids=rng.integers(3, 290, 30).tolist(),
        )
        for i in range(30)
    ]
    ckpt = build_moelab(tmp_path)
    store = trace_model(
        ckpt, docs, None, tmp_path / "store", max_tokens=300, seq_len=32, progress=False
    )
    names = store.meta.domains
    dom = np.asarray([names[int(i)] for i in store.load().domain])
    assert dom.size == 300
    share = float((dom == "prose").mean())
    assert 0.4 <= share <= 0.6, share
    assert store.meta.extra["run"]["sampling"].startswith("round-robin by domain")
