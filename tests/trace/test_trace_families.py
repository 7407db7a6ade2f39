"""Every MoE family of the installed transformers is traced exactly or refused before writing.

The families are enumerated from transformers itself (config classes declaring experts), so a
family that a new transformers release adds fails here until moelab traces it exactly or
refuses it with a reason (moelab.trace.adapters.UNSUPPORTED). Each family: a tiny random-init
model with non-zero routers and selection biases, saved with save_pretrained, reloaded by path
through moelab's loader, traced, and compared slot by slot with the expert ids and weights its
experts modules were called with (independent hooks, moelab.trace.families.ExpertsRecorder).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moelab.trace.adapters import UNSUPPORTED
from moelab.trace.families import FamilyResult, check_family, moe_model_types

FAMILIES = moe_model_types()
DOCS_TABLE = Path(__file__).resolve().parents[2] / "docs" / "guide" / "hf_families.md"
# check_family's result per family traced above, so that the null/capacity test below reuses it
# instead of building and tracing the same tiny model again
CHECKED: dict[str, FamilyResult] = {}


def checked(model_type: str, tmp: Path) -> FamilyResult:
    """The earlier check_family result for this family, else check_family(model_type, tmp)."""
    if model_type not in CHECKED:
        CHECKED[model_type] = check_family(model_type, tmp)
    return CHECKED[model_type]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_is_traced_exactly_or_refused_before_writing(
    model_type: str, tmp_path: Path
) -> None:
    r = CHECKED[model_type] = check_family(model_type, tmp_path)  # always built and traced here
    if model_type in UNSUPPORTED:
        assert r.status == "refused", r.detail
        assert UNSUPPORTED[model_type] in r.detail and "Supported:" in r.detail
        assert not (tmp_path / "trace").exists()
        return
    assert r.status == "exact", f"{model_type}: {r.status}: {r.detail}"
    assert r.num_layers >= 1 and r.top_k >= 1 and r.num_experts >= 8
    if r.selection_bias and r.logits:
        # the bias / table changed the model's choice: top-k of the raw logits would be wrong
        assert r.differs is not None and r.differs > 0, model_type


def test_enough_families_and_every_refusal_has_a_reason() -> None:
    refused = [f for f in FAMILIES if f in UNSUPPORTED]
    assert len(FAMILIES) - len(refused) >= 45
    assert all(len(UNSUPPORTED[f]) > 30 for f in refused)


@pytest.mark.parametrize(
    ("model_type", "what"),
    [("longcat_flash", "null"), ("zaya", "null"), ("switch_transformers", "dropped")],
)
def test_null_experts_and_capacity_drops_are_marked(
    model_type: str, what: str, tmp_path: Path
) -> None:
    if model_type not in FAMILIES:
        pytest.skip(f"{model_type} not in this transformers release")
    r = checked(model_type, tmp_path)
    assert r.status == "exact", r.detail
    if what == "null":
        assert r.null_experts >= 1 and r.num_experts > 8  # null ids beyond the 8 real experts
    else:
        assert r.dropped > 0  # capacity 4 per expert: some tokens over capacity


def test_docs_table_lists_every_family() -> None:
    """docs/guide/hf_families.md (tools/gen_hf_families.py) covers this transformers release."""
    text = DOCS_TABLE.read_text()
    listed = set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.M))
    missing = sorted(set(FAMILIES) - listed)
    assert not missing, f"rerun tools/gen_hf_families.py; families not in the table: {missing}"
