"""tools/gen_api_docs.py: runs, covers every subpackage, documents real signatures, deterministic."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "moelab"


@pytest.fixture(scope="module")
def gen():
    """The generator module, imported from its file."""
    spec = importlib.util.spec_from_file_location(
        "gen_api_docs", ROOT / "tools" / "gen_api_docs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pages(gen):
    return gen.build_pages()


def subpackages() -> list[str]:
    """Every first-level subpackage under src/moelab (a folder with __init__.py)."""
    return sorted(p.parent.name for p in SRC.glob("*/__init__.py"))


def test_every_subpackage_has_a_page_linked_from_the_index(pages) -> None:
    subs = subpackages()
    assert len(subs) >= 10  # layers, models, data, train, trace, analysis, predict, offload, ...
    for sub in subs:
        assert sub in pages, f"no API page for moelab.{sub}"
        assert f"# API reference: `moelab.{sub}`" in pages[sub]
        assert f"]({sub}.md)" in pages["index"], f"index does not link {sub}.md"
    assert "core" in pages and "## `moelab.errors`" in pages["core"]


def test_pages_hold_real_signatures_and_docstrings(pages, gen) -> None:
    from moelab.layers.moe import MoEBlock
    from moelab.predict.base import Predictor
    from moelab.trace.api import trace_model

    trace_page = pages["trace"]
    assert f"def trace_model{gen.signature(trace_model)}" in trace_page
    assert "out: str | Path" in gen.signature(trace_model)  # string annotations unquoted
    first = inspect.getdoc(trace_model).split("\n\n")[0].replace("\n", " ")
    assert first in trace_page
    assert f"class MoEBlock{gen.signature(MoEBlock)}" in pages["layers"]
    assert "- `forward(self, x: torch.Tensor" in pages["layers"]
    # methods of public classes, classmethods marked, properties listed
    assert "- classmethod `load(cls, path: str | Path) -> Predictor`" in pages["predict"]
    assert "property `num_tokens`" in pages["trace"]
    # inherited from a private base: MixtureOfExperts.accuracy comes from classic._Base
    assert "`accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float`" in pages["layers"]
    # pydantic model fields
    assert "pydantic model TrainConfig(" in pages["train"] and "`d_model`" in pages["train"]
    assert Predictor.__name__ in pages["predict"]


def test_private_names_and_modules_are_left_out(pages) -> None:
    text = "\n".join(pages.values())
    assert "moelab._io" not in text
    assert "moelab.analysis._common" not in text
    assert "### `_" not in text
    assert " at 0x" not in text  # no memory addresses: output is machine independent


def test_output_is_deterministic_and_written(gen, pages, tmp_path: Path) -> None:
    assert gen.build_pages() == pages
    written = gen.write_pages(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{name}.md" for name in pages)
    for path in written:
        assert path.read_text() == pages[path.stem]
    assert gen.main(["--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "index.md").read_text() == pages["index"]
