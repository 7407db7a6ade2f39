"""Token text <-> id for the explorer, through the tokenizer.json kept in the trace store.

Search by text finds every vocabulary entry whose decoded form equals the text, with or
without surrounding whitespace (so "can" finds both "can" and " can" of a byte-level BPE);
a text that the tokenizer encodes as several tokens ("I can") is also returned as that
sequence, so the page can use its last token with the previous one as context. Without a
tokenizer only ids work and tokens are shown as <id>.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import DataError

MAX_MATCHES = 50


@dataclass
class Vocab:
    """The trace's tokenizer (or None) with every id's decoded text precomputed."""

    tokenizer: Any = None
    texts: list[str] = field(default_factory=list)  # id -> decoded text
    by_text: dict[str, list[int]] = field(default_factory=dict)  # stripped text -> ids
    note: str = ""

    @property
    def size(self) -> int:
        """Number of ids the tokenizer knows (0 without a tokenizer)."""
        return len(self.texts)

    def text(self, token_id: int) -> str:
        """Decoded text of one id, or <id> when unknown."""
        if 0 <= token_id < len(self.texts):
            return self.texts[token_id]
        return f"<{token_id}>"

    def search(self, query: str) -> tuple[list[int], list[int]]:
        """(ids whose text equals the query up to surrounding whitespace, the query's own
        encoding as ids when it decodes back to the query); both empty when nothing matches."""
        if self.tokenizer is None:
            raise DataError(
                "this trace has no tokenizer (no tokenizer.json in the store): search by token id"
            )
        exact = [i for i, t in enumerate(self.texts) if t == query] if len(query) > 0 else []
        loose = [i for i in self.by_text.get(query.strip(), []) if i not in exact]
        seq = list(self.tokenizer.encode(query, add_special_tokens=False).ids) if query else []
        if seq and self.tokenizer.decode(seq, skip_special_tokens=False).strip() != query.strip():
            seq = []  # the text does not round-trip (unknown-token ids): not these tokens
        return (exact + loose)[:MAX_MATCHES], seq

    def window(self, ids: list[int], center: int) -> tuple[str, str, str]:
        """Decoded (left, token, right) text of a window of ids with the token at `center`.

        Uses decoding of prefixes so the tokenizer's own spacing rules apply; falls back to
        decoding the token alone when a prefix's decoding is not a prefix of the longer one.
        """
        if self.tokenizer is None:
            parts = [f"<{i}>" for i in ids]
            return (
                " ".join(parts[:center]) + (" " if center else ""),
                parts[center],
                (" " if center + 1 < len(parts) else "") + " ".join(parts[center + 1 :]),
            )
        dec = self.tokenizer.decode
        left = dec(ids[:center], skip_special_tokens=False)
        upto = dec(ids[: center + 1], skip_special_tokens=False)
        full = dec(ids, skip_special_tokens=False)
        if upto.startswith(left) and full.startswith(upto):
            return left, upto[len(left) :], full[len(upto) :]
        return left, dec([ids[center]], skip_special_tokens=False), dec(ids[center + 1 :])


def load_vocab(store_path: Path, meta: Any, tokenizer: Path | None = None) -> Vocab:
    """The trace's tokenizer (--tokenizer, else the store's tokenizer.json, else meta.tokenizer)."""
    from moelab.analysis.commands import trace_tokenizer

    tok, note = trace_tokenizer(Path(store_path), meta, tokenizer)
    if tok is None:
        return Vocab(note=note)
    n = tok.get_vocab_size(with_added_tokens=True)
    texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t.strip(), []).append(i)
    return Vocab(tokenizer=tok, texts=list(texts), by_text=by_text)
