"""Helpers of the explore tests: a tiny trace store with a word-level tokenizer.json, and
numpy references read back from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moelab.analysis._common import doc_split
from moelab.analysis.synthetic import synthetic_trace
from moelab.trace.schema import NO_EXPERT
from moelab.trace.store import TraceStore, write_trace

WORDS = ["<s>", ",", "can", "I", " can", "the"] + [f"w{i}" for i in range(6, 50)]
CAN, I_, SPACE_CAN = 2, 3, 4
HELD_DROP = 907  # row with a dropped slot in a held-out document (asserted in build_store)


def write_tokenizer(path: Path) -> None:
    """A WordLevel tokenizer.json over WORDS (whitespace pre-tokenizer)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<s>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))


def build_store(root: Path, n: int = 4000, shard_tokens: int = 700, held_drop: bool = True) -> Path:
    """Synthetic routing over 3 MoE layers, top-2 of 8, 2 domains, one dropped slot."""
    tr = synthetic_trace(
        n, 3, 8, 2, vocab=len(WORDS), doc_len=100, n_domains=2, logits=False, seed=3
    )
    tr.expert_ids[7, 1, 1] = NO_EXPERT
    tr.weights[7, 1, 1] = 0.0
    if held_drop:
        docs = np.unique(tr.doc_id)
        assert tr.doc_id[HELD_DROP] in docs[doc_split(docs, 0.2, 0)]  # the default split
        tr.expert_ids[HELD_DROP, 2, 1] = NO_EXPERT
        tr.weights[HELD_DROP, 2, 1] = 0.0
    tr.meta.split = "test"
    write_trace(tr, root, shard_tokens=shard_tokens, logits=False, chunk_tokens=500)
    write_tokenizer(root / "tokenizer.json")
    return root


class Ref:
    """The store read back with TraceStore.load (numpy), plus previous / next token ids."""

    def __init__(self, root: Path) -> None:
        self.trace = TraceStore.open(root).load()
        t = self.trace
        prev_row = t.prev_row()
        self.prev = np.where(prev_row >= 0, t.token_id[np.maximum(prev_row, 0)], -1)
        nxt = np.full(t.num_tokens, -1, np.int64)
        has = prev_row >= 0
        nxt[prev_row[has]] = t.token_id[has]
        self.next = nxt
        self.keep = ~t.is_bos

    def mask(self, token, prev=None, next=None, domain=None) -> np.ndarray:
        m = self.keep & (self.trace.token_id == token)
        if prev is not None:
            m &= self.prev == prev
        if next is not None:
            m &= self.next == next
        if domain is not None:
            m &= self.trace.domain == self.trace.meta.domains.index(domain)
        return m
