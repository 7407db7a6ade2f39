"""Generate the plain-Markdown API reference of moelab from docstrings and signatures.

Walks every module under `src/moelab` with `pkgutil`/`importlib`, keeps the public names each
module defines itself (no leading underscore, `obj.__module__` equal to the module; `__all__`
re-exports are listed but not repeated), and writes one page per subpackage to
`docs/api/<subpackage>.md` (top-level modules go to `docs/api/core.md`) plus
`docs/api/index.md`. Each entry is the `inspect.signature` and the first paragraph of the
docstring. Output is deterministic: modules and members are sorted, object addresses are
stripped from default values, and nothing depends on time or the machine.

Usage: `python tools/gen_api_docs.py [--out docs/api]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moelab"
CORE_PAGE = "core"
_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")
# String annotations (from `from __future__ import annotations`) print quoted: unquote them.
_QUOTED_ANN = re.compile(r"(: |-> )'([^']*)'")


def iter_modules(package: str = PACKAGE) -> list[str]:
    """Sorted dotted names of every module under `package` (the package itself included)."""
    pkg = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue  # private modules (moelab._io, analysis._common) are not public API
        names.append(info.name)
    return sorted(names)


def page_of(module_name: str) -> str:
    """Page a module is documented on: its first-level subpackage, or `core`."""
    parts = module_name.split(".")
    if len(parts) >= 2:
        sub = importlib.import_module(".".join(parts[:2]))
        if hasattr(sub, "__path__"):
            return parts[1]
    return CORE_PAGE


def first_paragraph(obj: Any) -> str:
    """First paragraph of an object's own docstring, joined into one line ('' if none)."""
    doc = inspect.getdoc(obj) if obj is not None else None
    if not doc:
        return ""
    para = doc.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in para.splitlines())


def signature(obj: Any) -> str:
    """`inspect.signature` text of a callable with memory addresses removed ('' if none)."""
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return _QUOTED_ANN.sub(r"\1\2", _ADDR.sub("", sig))


def is_public(name: str) -> bool:
    """Public means no leading underscore."""
    return not name.startswith("_")


def own_members(module: ModuleType) -> list[tuple[str, Any]]:
    """Public functions and classes defined in `module` itself, sorted by name."""
    out = []
    for name, obj in vars(module).items():
        if not is_public(name):
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(
            obj, "__module__", None
        ) == module.__name__:
            out.append((name, obj))
    return sorted(out, key=lambda t: t[0])


def class_methods(cls: type) -> list[tuple[str, Any, str]]:
    """Public methods/properties defined on `cls` itself: (name, object, kind), sorted."""
    out = []
    seen: set[str] = set()
    # Own attributes first, then those inherited from private moelab bases (not documented
    # anywhere else), so e.g. `accuracy` of `_Base` shows up under each public subclass.
    owners = [cls] + [
        b
        for b in cls.__mro__[1:]
        if b.__name__.startswith("_") and getattr(b, "__module__", "").startswith(PACKAGE)
    ]
    items = [(n, r) for owner in owners for n, r in vars(owner).items()]
    for name, raw in items:
        if not is_public(name) or name in seen:
            continue
        seen.add(name)
        if isinstance(raw, property):
            out.append((name, raw, "property"))
        elif isinstance(raw, staticmethod):
            out.append((name, raw.__func__, "staticmethod"))
        elif isinstance(raw, classmethod):
            out.append((name, raw.__func__, "classmethod"))
        elif inspect.isfunction(raw):
            out.append((name, raw, "method"))
    return sorted(out, key=lambda t: t[0])


def _pydantic_fields(cls: type) -> list[str]:
    """Field names of a pydantic model class ([] for anything else)."""
    fields = getattr(cls, "model_fields", None)
    return list(fields) if isinstance(fields, dict) else []


def _class_header(cls: type) -> str:
    """Constructor signature of a class (dataclass fields included via __init__)."""
    if issubclass(cls, enum.Enum):
        return ""
    if _pydantic_fields(cls):
        parts = []
        for fname, info in cls.model_fields.items():
            ann = inspect.formatannotation(info.annotation)
            default = "..." if info.is_required() else repr(info.default)
            parts.append(f"{fname}: {ann} = {default}")
        return _ADDR.sub("", "(*, " + ", ".join(parts) + ")")
    init = cls.__dict__.get("__init__")
    if init is None and not dataclasses.is_dataclass(cls):
        # Inherited constructor: show it only when a base in moelab defines it.
        for base in cls.__mro__[1:]:
            if "__init__" in base.__dict__ and base.__module__.startswith(PACKAGE):
                init = base.__dict__["__init__"]
                break
    if init is None and not dataclasses.is_dataclass(cls):
        return ""
    sig = signature(cls)
    return sig


def document_class(name: str, cls: type) -> list[str]:
    """Markdown lines for one class and its public methods."""
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    kind = "class"
    if _pydantic_fields(cls):
        kind = "pydantic model"
    elif dataclasses.is_dataclass(cls):
        kind = "dataclass"
    elif issubclass(cls, enum.Enum):
        kind = "enum"
    lines = [f"### `{name}`", ""]
    header = f"{kind} {name}{_class_header(cls)}"
    if bases:
        header += f"  # bases: {', '.join(bases)}"
    lines += ["```python", header, "```", ""]
    doc = first_paragraph(cls)
    if doc:
        lines += [doc, ""]
    if dataclasses.is_dataclass(cls):
        fields = [f for f in dataclasses.fields(cls) if is_public(f.name)]
        if fields:
            lines.append("Fields: " + ", ".join(f"`{f.name}`" for f in fields) + ".")
            lines.append("")
    if _pydantic_fields(cls):
        names = [n for n in _pydantic_fields(cls) if is_public(n)]
        lines.append("Fields: " + ", ".join(f"`{n}`" for n in names) + ".")
        lines.append("")
    if issubclass(cls, enum.Enum):
        lines.append("Members: " + ", ".join(f"`{m.name}`" for m in cls) + ".")
        lines.append("")
    for mname, obj, mkind in class_methods(cls):
        prefix = "" if mkind == "method" else f"{mkind} "
        sig = "" if mkind == "property" else signature(obj)
        text = first_paragraph(obj.fget if mkind == "property" else obj)
        item = f"- {prefix}`{mname}{sig}`"
        if text:
            item += f" — {text}"
        lines.append(item)
    if lines[-1] != "":
        lines.append("")
    return lines


def document_function(name: str, fn: Any) -> list[str]:
    """Markdown lines for one function."""
    lines = [f"### `{name}`", "", "```python", f"def {name}{signature(fn)}", "```", ""]
    doc = first_paragraph(fn)
    if doc:
        lines += [doc, ""]
    return lines


def document_module(module: ModuleType) -> list[str]:
    """Markdown section of one module: docstring, re-exports, functions, classes."""
    lines = [f"## `{module.__name__}`", ""]
    doc = first_paragraph(module)
    if doc:
        lines += [doc, ""]
    exported = [n for n in getattr(module, "__all__", []) if is_public(n)]
    own = own_members(module)
    own_names = {n for n, _ in own}
    reexports = sorted(n for n in exported if n not in own_names)
    if reexports:
        lines += ["Re-exports: " + ", ".join(f"`{n}`" for n in reexports) + ".", ""]
    for name, obj in own:
        if inspect.isclass(obj):
            lines += document_class(name, obj)
        else:
            lines += document_function(name, obj)
    return lines


def build_pages(package: str = PACKAGE) -> dict[str, str]:
    """Page name -> Markdown text for every subpackage (and `core`)."""
    by_page: dict[str, list[ModuleType]] = {}
    for name in iter_modules(package):
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        by_page.setdefault(page_of(name), []).append(module)
    pages: dict[str, str] = {}
    for page, modules in sorted(by_page.items()):
        title = f"`{package}.{page}`" if page != CORE_PAGE else f"`{package}` core modules"
        lines = [
            f"# API reference: {title}",
            "",
            "Generated by `tools/gen_api_docs.py` from signatures and docstrings; do not edit.",
            "",
        ]
        for module in modules:
            lines += document_module(module)
        pages[page] = "\n".join(lines).rstrip() + "\n"
    index = [
        "# moelab API reference",
        "",
        "Generated by `tools/gen_api_docs.py` (one page per subpackage; signature and first",
        "docstring paragraph of every public function, class and method). The user guide is",
        "in [`docs/guide/`](../guide/).",
        "",
        "| page | modules | summary |",
        "|---|---|---|",
    ]
    for page, modules in sorted(by_page.items()):
        top = modules[0]
        summary = first_paragraph(top).replace("|", "\\|")
        index.append(f"| [{page}]({page}.md) | {len(modules)} | {summary} |")
    pages["index"] = "\n".join(index) + "\n"
    return pages


def write_pages(out_dir: Path, package: str = PACKAGE) -> list[Path]:
    """Write every page into `out_dir` (atomically when moelab._io is available)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from moelab._io import atomic_write_text
    except ImportError:  # pragma: no cover - moelab is always importable here
        atomic_write_text = None
    written = []
    for page, text in build_pages(package).items():
        path = out_dir / f"{page}.md"
        if atomic_write_text is not None:
            atomic_write_text(path, text)
        else:
            path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "api")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    paths = write_pages(args.out)
    print(f"wrote {len(paths)} pages to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
