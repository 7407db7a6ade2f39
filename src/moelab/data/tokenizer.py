"""Tokenizers: byte-level BPE trained with `tokenizers`, or a local Hugging Face tokenizer.

Byte-level BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units"; byte-level variant of Radford et al. 2019, GPT-2, Sec. 2.2) never needs an unknown
token and decodes back to the exact input text. It is trained on the training split only;
include the non-English text in that split or Russian/Chinese tokenise near byte level.
Special tokens: ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``, ``<mask>`` (ids 0..4).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab._io import atomic_write_text
from moelab.data.corpora import Document
from moelab.errors import ConfigError, DataError

__all__ = ["SPECIAL_TOKENS", "SpecialIds", "train_tokenizer", "load_tokenizer", "special_ids"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")
# names other tokenizers use for the same roles (HF conventions), tried in order
_ALIASES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"),
    "bos": ("<bos>", "<s>", "[CLS]", "<|im_start|>", "<|endoftext|>", "<|begin_of_text|>"),
    "eos": ("<eos>", "</s>", "[SEP]", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "mask": ("<mask>", "[MASK]"),
}


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens (None when a tokenizer has no such token)."""

    pad: int | None
    bos: int | None
    eos: int | None
    unk: int | None
    mask: int | None

    def all(self) -> list[int]:
        """Every defined special id."""
        return sorted(
            {i for i in (self.pad, self.bos, self.eos, self.unk, self.mask) if i is not None}
        )


def special_ids(tok: Tokenizer) -> SpecialIds:
    """Look up the special tokens of a tokenizer by moelab's names, then common HF names."""
    found = {}
    for role, names in _ALIASES.items():
        found[role] = next(
            (tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None
        )
    return SpecialIds(**found)


def train_tokenizer(
    docs: Iterable[Document] | Iterable[str],
    vocab_size: int = 8192,
    out_path: str | os.PathLike[str] | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on the given documents (the training split) and save it to out_path."""
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(
            f"train_tokenizer: vocab_size={vocab_size!r} must be an int >= {256 + len(SPECIAL_TOKENS)}"
            " (256 byte symbols + special tokens)"
        )
    texts = [d.text if isinstance(d, Document) else d for d in docs]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("train_tokenizer: no text to train on (empty training split)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if out_path is not None:
        atomic_write_text(out_path, tok.to_str(pretty=False))
    return tok


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer.json file, or a local Hugging Face tokenizer folder (fast tokenizers)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"tokenizer {p} does not exist; expected a tokenizer.json file or a local HF tokenizer folder"
        )
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise DataError(
                    f"tokenizer folder {p} has no tokenizer.json; loading it needs transformers"
                    " (pip install transformers)"
                ) from None
            try:
                hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            except Exception as exc:
                raise DataError(
                    f"tokenizer folder {p}: transformers could not load it ({exc})"
                ) from None
            backend = getattr(hf, "backend_tokenizer", None)
            if backend is None:
                raise DataError(f"tokenizer folder {p}: only fast (Rust) tokenizers are supported")
            return backend
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:
        raise DataError(
            f"tokenizer file {p} cannot be read ({exc}); expected a `tokenizers` JSON file"
        ) from None


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batch-encoded in Rust)."""
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
