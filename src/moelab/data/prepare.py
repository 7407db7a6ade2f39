"""One call from a corpus name to a ready training folder: splits, tokenizer and token files.

``prepare_data(corpus, out_dir)`` loads the corpus, splits it by document (splits.json), trains
a byte-level BPE on the training split only (tokenizer.json) or loads a given tokenizer, and
writes each split's tokens with their provenance (tokens/<split>.npz). When the folder already
holds these files (a resumed or compared run) they are reused as they are, so every run in a
folder sees exactly the same data. Pipeline as in Radford et al. 2019 (GPT-2): held-out
documents, tokenizer fitted on training text only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from moelab._io import atomic_write_json
from moelab.data.corpora import corpus_domains, load_corpus
from moelab.data.dataset import TokenStream, tokenize_documents
from moelab.data.splits import SPLITS, save_splits, split_documents
from moelab.data.tokenizer import load_tokenizer, train_tokenizer
from moelab.errors import DataError

__all__ = ["PreparedData", "prepare_data", "load_prepared"]


@dataclass
class PreparedData:
    """Paths and contents of a prepared data folder."""

    root: Path
    tokenizer: Tokenizer
    streams: dict[str, TokenStream]  # split -> tokens
    domains: list[str]
    info: dict

    @property
    def tokenizer_path(self) -> Path:
        """Path of tokenizer.json."""
        return self.root / "tokenizer.json"


MIN_BYTES_PER_TOKEN = 1.5  # below this the tokenizer splits a script into ~single bytes


def bytes_per_token(
    splits: dict[str, list], streams: dict[str, TokenStream], domains: list[str]
) -> dict[str, float]:
    """UTF-8 bytes of text per token, per domain, over every split (each document's leading
    special token, at position 0, is not counted)."""
    nbytes = dict.fromkeys(domains, 0)
    ntok = dict.fromkeys(domains, 0)
    for s, docs in splits.items():
        for d in docs:
            nbytes[str(d.domain)] = nbytes.get(str(d.domain), 0) + len(d.text.encode("utf-8"))
        st = streams.get(s)
        if st is None:
            continue
        counted = st.domain[st.pos > 0]
        for i, name in enumerate(st.domains):
            ntok[name] = ntok.get(name, 0) + int((counted == i).sum())
    return {d: nbytes[d] / ntok[d] for d in nbytes if ntok.get(d)}


def coverage_warnings(
    bpt: dict[str, float], vocab_size: int, tok_source: str, threshold: float = MIN_BYTES_PER_TOKEN
) -> list[str]:
    """One message per domain whose text tokenises below `threshold` bytes/token."""
    best = max(bpt.values(), default=0.0)
    out = []
    for dom, v in sorted(bpt.items()):
        if v < threshold:
            fix = (
                "include text of this script in the tokenizer's training data (it is trained on"
                " the train split) and/or raise --vocab-size"
                if tok_source == "bpe-trained-on-train-split"
                else "use a tokenizer trained on text of this script (or train one with"
                " moelab: drop --tokenizer) and/or a larger vocabulary"
            )
            out.append(
                f"domain {dom!r} tokenises at {v:.2f} bytes/token (best domain {best:.2f},"
                f" vocab {vocab_size}): the tokenizer barely covers this script, so its"
                f" documents cost several tokens per character and the model sees little of it;"
                f" {fix}"
            )
    return out


def load_prepared(root: str | os.PathLike[str]) -> PreparedData:
    """Open a folder written by `prepare_data`."""
    root = Path(root)
    info_path = root / "data.json"
    if not info_path.is_file():
        raise DataError(
            f"{root} is not a prepared data folder (no data.json); run `moelab train` first"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    tok = load_tokenizer(root / "tokenizer.json")
    streams = {
        s: TokenStream.load(root / "tokens" / f"{s}.npz")
        for s in SPLITS
        if (root / "tokens" / f"{s}.npz").is_file()
    }
    return PreparedData(root, tok, streams, list(info["domains"]), info)


def prepare_data(
    corpus: str,
    out_dir: str | os.PathLike[str],
    vocab_size: int = 8192,
    seed: int = 0,
    max_bytes: int | None = None,
    text_column: str = "text",
    tokenizer: str | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    add_eos: bool = False,
) -> PreparedData:
    """Load, split, tokenise and save a corpus into `out_dir` (reused if already prepared)."""
    root = Path(out_dir)
    if (root / "data.json").is_file():
        prepared = load_prepared(root)
        if prepared.info.get("corpus") != str(corpus) or prepared.info.get("seed") != seed:
            raise DataError(
                f"{root} already holds data prepared from corpus={prepared.info.get('corpus')!r}"
                f" seed={prepared.info.get('seed')}, not corpus={corpus!r} seed={seed}; use another folder"
            )
        return prepared
    docs = load_corpus(corpus, max_bytes=max_bytes, seed=seed, text_column=text_column)
    splits = split_documents(docs, fractions=fractions, seed=seed)
    if not splits["train"]:
        raise DataError(f"corpus {corpus!r}: the training split is empty ({len(docs)} documents)")
    if not splits["validation"]:
        raise DataError(
            f"corpus {corpus!r}: the validation split is empty ({len(docs)} documents);"
            " a corpus needs at least 3 documents"
        )
    root.mkdir(parents=True, exist_ok=True)
    save_splits(splits, root / "splits.json", seed=seed)
    if tokenizer is None:
        tok = train_tokenizer(
            splits["train"], vocab_size=vocab_size, out_path=root / "tokenizer.json"
        )
        tok_source = "bpe-trained-on-train-split"
    else:
        tok = load_tokenizer(tokenizer)
        src = Path(tokenizer)
        src_file = src / "tokenizer.json" if src.is_dir() else src
        if src_file.is_file():
            shutil.copyfile(src_file, root / "tokenizer.json")
        else:
            tok.save(str(root / "tokenizer.json"))
        tok_source = str(tokenizer)
    domains = corpus_domains(docs)
    streams = {}
    for s in SPLITS:
        if not splits[s]:
            continue
        streams[s] = tokenize_documents(splits[s], tok, domains=domains, add_eos=add_eos)
        streams[s].save(root / "tokens" / f"{s}.npz")
    info = {
        "corpus": str(corpus),
        "seed": seed,
        "max_bytes": max_bytes,
        "fractions": list(fractions),
        "tokenizer": tok_source,
        "vocab_size": tok.get_vocab_size(),
        "domains": domains,
        "documents": {s: len(splits[s]) for s in SPLITS},
        "tokens": {s: len(streams[s]) for s in streams},
        "bytes": {s: sum(len(d.text.encode("utf-8")) for d in splits[s]) for s in SPLITS},
    }
    bpt = bytes_per_token(splits, streams, domains)
    warnings = coverage_warnings(bpt, tok.get_vocab_size(), tok_source)
    info["bytes_per_token"] = {d: round(v, 3) for d, v in bpt.items()}
    info["tokenizer_warnings"] = warnings
    if warnings:
        from rich.console import Console

        err = Console(stderr=True)
        for w in warnings:
            err.print(f"[bold yellow]warning:[/] {w}", highlight=False)
    atomic_write_json(root / "data.json", info)  # written last: marks the folder complete
    return PreparedData(root, tok, streams, domains, info)
