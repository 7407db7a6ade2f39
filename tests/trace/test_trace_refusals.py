"""Tracing refuses models it would trace wrongly (NaN routers, undecodable router outputs,
unsupported families) and leaves nothing half-written that would block a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trace_testutil import make_docs

from moelab.errors import ModelError
from moelab.trace.api import trace_model
from moelab.trace.hf_generic import GenericHFAdapter
from moelab.trace.store import TraceStore


def _mixtral(mixtral_dir: Path):  # type: ignore[no-untyped-def]
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(mixtral_dir)).eval()


def test_nan_router_weight_is_refused_before_writing(tmp_path: Path, mixtral_dir: Path) -> None:
    model = _mixtral(mixtral_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[3, 5] = float("nan")
    out = tmp_path / "store"
    with pytest.raises(ModelError) as err:
        trace_model(model, make_docs(4), None, out, seq_len=16, progress=False)
    msg = str(err.value)
    assert "model.layers.1.mlp.gate" in msg and "MoE layer 1" in msg
    assert "'weight'" in msg and "1 non-finite" in msg and "NaN" in msg
    assert not out.exists()


def test_nan_reaching_the_router_is_refused_and_nothing_is_left(
    tmp_path: Path, mixtral_dir: Path
) -> None:
    """A NaN before the first router (attention weight): the router weights are finite but its
    logits are NaN; every token would be 'routed' to fixed experts with NaN weights."""
    model = _mixtral(mixtral_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelError) as err:
        trace_model(model, make_docs(4), None, out, seq_len=16, progress=False)
    msg = str(err.value)
    assert "MoE layer 0, transformer layer 0" in msg and "router logits are not finite" in msg
    assert "--dtype float32" in msg
    # the folder existed: only what the failed run created is removed
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # the fixed model traces into the same folder (nothing blocks the rerun)
    good = _mixtral(mixtral_dir)
    st = trace_model(good, make_docs(4), None, out, seq_len=16, progress=False)
    assert st.num_tokens > 0 and (out / "meta.json").is_file()


def test_undecodable_routing_is_refused_before_anything_is_written(
    tmp_path: Path, mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routing that cannot be decoded (here: float expert ids) is found on the first batch,
    which is run and checked before meta.json or any other file is written."""
    orig = GenericHFAdapter.decode_capture

    def float_ids(self, site, cap):  # type: ignore[no-untyped-def]
        args, kwargs = cap["experts"]
        args = (args[0], args[1].float(), *args[2:])
        return orig(self, site, {**cap, "experts": (args, kwargs)})

    monkeypatch.setattr(GenericHFAdapter, "decode_capture", float_ids)
    out = tmp_path / "store"
    with pytest.raises(ModelError, match="expected integer expert ids"):
        trace_model(mixtral_dir, make_docs(4), None, out, seq_len=16, progress=False)
    assert not out.exists()


def test_unsupported_family_writes_nothing(tmp_path: Path) -> None:
    model = tmp_path / "llama4"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama4"}))
    out = tmp_path / "store"
    with pytest.raises(ModelError, match="'llama4' is not supported") as err:
        trace_model(model, make_docs(2), None, out, progress=False)
    assert "llama4_text" in str(err.value) and "Supported:" in str(err.value)
    assert not out.exists()


def test_failure_after_committed_shards_keeps_them_for_resume(
    tmp_path: Path, mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cleanup never deletes committed work: a run that fails later resumes from its shards."""
    docs = make_docs(7)
    kw = dict(seq_len=16, batch_size=1, shard_tokens=8, progress=False)
    calls = {"n": 0}
    orig = GenericHFAdapter.run

    def flaky(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 6:
            raise ModelError("simulated failure on batch 6")
        return orig(self, input_ids, attention_mask)

    monkeypatch.setattr(GenericHFAdapter, "run", flaky)
    out = tmp_path / "store"
    with pytest.raises(ModelError, match="simulated"):
        trace_model(mixtral_dir, docs, None, out, **kw)
    assert (out / "meta.json").is_file() and list((out / "shards").glob("*.parquet"))
    monkeypatch.setattr(GenericHFAdapter, "run", orig)
    resumed = trace_model(mixtral_dir, docs, None, out, **kw).load()
    full = trace_model(mixtral_dir, docs, None, tmp_path / "full", **kw).load()
    assert (resumed.expert_ids == full.expert_ids).all()
    assert TraceStore.open(out).num_tokens == full.num_tokens
