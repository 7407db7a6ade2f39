"""Tokenised corpora with per-token provenance, and packing into fixed-length training blocks.

Every document is tokenised on its own (``<bos>`` + its tokens), and each token keeps the index
of its document and its position in it, so routing traces can be attributed to documents,
positions and domains. For training, the documents of a split are concatenated and cut into
blocks of ``seq_len`` tokens (the "FULL-SENTENCES" packing of Liu et al. 2019, RoBERTa,
Sec. 4.2; nanoGPT does the same), dropping the last partial block.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from moelab._io import atomic_write_with
from moelab.data.corpora import Document, corpus_domains
from moelab.data.tokenizer import encode_texts, special_ids
from moelab.errors import DataError

__all__ = ["TokenStream", "PackedBlocks", "tokenize_documents", "pack_blocks"]


@dataclass
class TokenStream:
    """All tokens of a list of documents in order, with per-token provenance.

    ids [N] int32 token ids; doc [N] int32 index into `doc_ids`; pos [N] int32 position inside
    the document (0 = its <bos>); domain [N] int16 index into `domains`.
    """

    ids: np.ndarray
    doc: np.ndarray
    pos: np.ndarray
    domain: np.ndarray
    doc_ids: list[str]
    domains: list[str]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an .npz (arrays + JSON tables) atomically."""
        meta = json.dumps({"doc_ids": self.doc_ids, "domains": self.domains})

        def write(tmp: Path) -> None:
            buf = io.BytesIO()
            np.savez(
                buf,
                ids=self.ids,
                doc=self.doc,
                pos=self.pos,
                domain=self.domain,
                meta=np.array(meta),
            )
            tmp.write_bytes(buf.getvalue())

        atomic_write_with(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStream:
        """Read a stream written by `save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return cls(
                    z["ids"], z["doc"], z["pos"], z["domain"], meta["doc_ids"], meta["domains"]
                )
        except FileNotFoundError:
            raise DataError(f"token file {path} does not exist") from None
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(f"token file {path} is unreadable or malformed ({exc})") from None


def tokenize_documents(
    docs: Sequence[Document],
    tok: Tokenizer,
    domains: Sequence[str] | None = None,
    add_bos: bool = True,
    add_eos: bool = False,
) -> TokenStream:
    """Tokenise each document separately and concatenate, keeping (doc, position, domain) per token."""
    if not docs:
        raise DataError("tokenize_documents: no documents (empty split)")
    domain_table = list(domains) if domains is not None else corpus_domains(docs)
    code = {d: i for i, d in enumerate(domain_table)}
    missing = {d.domain for d in docs} - set(code)
    if missing:
        raise DataError(
            f"tokenize_documents: domains {sorted(missing)} are not in the domain table {domain_table}"
        )
    sp = special_ids(tok)
    if add_bos and sp.bos is None:
        raise DataError(
            "tokenize_documents: add_bos=True but the tokenizer has no <bos>/<s>/[CLS] token"
        )
    if add_eos and sp.eos is None:
        raise DataError(
            "tokenize_documents: add_eos=True but the tokenizer has no <eos>/</s>/[SEP] token"
        )
    encoded = encode_texts(tok, [d.text for d in docs])
    pieces = []
    for ids in encoded:
        seq = ([sp.bos] if add_bos else []) + ids + ([sp.eos] if add_eos else [])
        pieces.append(np.asarray(seq, dtype=np.int32))
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    doc = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = (np.arange(ids.shape[0], dtype=np.int64) - starts).astype(np.int32)
    domain = np.repeat(np.array([code[d.domain] for d in docs], dtype=np.int16), lengths)
    return TokenStream(ids, doc, pos, domain, [d.doc_id for d in docs], domain_table)


@dataclass
class PackedBlocks:
    """Fixed-length blocks [B, S] of token ids with the provenance of every token."""

    input_ids: torch.Tensor  # int64 [B, S]
    doc: torch.Tensor  # int32 [B, S] index into doc_ids
    pos: torch.Tensor  # int32 [B, S]
    domain: torch.Tensor  # int16 -> int32 [B, S] index into domains
    doc_ids: list[str]
    domains: list[str]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """S."""
        return int(self.input_ids.shape[1])


def pack_blocks(stream: TokenStream, seq_len: int, max_blocks: int | None = None) -> PackedBlocks:
    """Cut the stream into consecutive blocks of `seq_len` tokens (last partial block dropped).

    With `max_blocks`, keep that many blocks evenly spaced over the whole stream (so a small
    evaluation sample still covers every domain and document range, not just the first ones).
    """
    if seq_len < 2:
        raise DataError(f"pack_blocks: seq_len={seq_len} must be >= 2")
    if max_blocks is not None and max_blocks < 1:
        raise DataError(f"pack_blocks: max_blocks={max_blocks} must be >= 1 (or None for all)")
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"pack_blocks: {len(stream)} tokens are fewer than one block of seq_len={seq_len};"
            " use a larger corpus or a shorter sequence length"
        )
    n = n_blocks * seq_len
    keep = None
    if max_blocks is not None and max_blocks < n_blocks:
        keep = torch.from_numpy(
            np.unique(np.linspace(0, n_blocks - 1, max_blocks).round().astype(np.int64))
        )

    def cut(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a[:n]).astype(np.int64)).reshape(
            n_blocks, seq_len
        )
        return (t if keep is None else t[keep]).to(dtype)

    return PackedBlocks(
        cut(stream.ids, torch.int64),
        cut(stream.doc, torch.int32),
        cut(stream.pos, torch.int32),
        cut(stream.domain, torch.int32),
        stream.doc_ids,
        stream.domains,
    )
