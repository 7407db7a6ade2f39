"""The generic transformers path: sizes cross-checked before writing, no layer left out,
loading by class, float32 logits, hash-routed layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from trace_testutil import make_docs

from moelab.errors import ModelError
from moelab.trace.api import load_model, trace_model
from moelab.trace.families import build_tiny


def _mixtral(mixtral_dir: Path):  # type: ignore[no-untyped-def]
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(mixtral_dir)).eval()


def test_config_top_k_disagreeing_with_the_model_is_refused_before_writing(
    tmp_path: Path, mixtral_dir: Path
) -> None:
    model = _mixtral(mixtral_dir)
    model.config.num_experts_per_tok = 3  # the routers still choose 2
    out = tmp_path / "s"
    with pytest.raises(ModelError, match="num_experts_per_tok=3 but the experts modules receive 2"):
        trace_model(model, make_docs(3), None, out, seq_len=16, progress=False)
    assert not out.exists()


def test_config_expert_count_disagreeing_with_the_weights_is_refused(mixtral_dir: Path) -> None:
    model = _mixtral(mixtral_dir)
    model.config.num_local_experts = 12
    with pytest.raises(ModelError, match="num_local_experts=12 but the experts modules hold 6"):
        trace_model(model, make_docs(2), None, "unused", seq_len=16, progress=False)


def test_an_untraceable_moe_layer_refuses_the_model(tmp_path: Path, mixtral_dir: Path) -> None:
    """A layer whose experts are not called with ids is never silently dropped."""
    model = _mixtral(mixtral_dir)

    class Opaque(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(6, 2, 2))
            self.inner = [inner]  # not a registered submodule: ids are not visible

        def forward(self, hidden_states, *rest):  # type: ignore[no-untyped-def]
            return self.inner[0](hidden_states, *rest)

    model.model.layers[1].mlp.experts = Opaque(model.model.layers[1].mlp.experts)
    with pytest.raises(
        ModelError, match=r"model\.layers\.1\.mlp\.(gate|experts) .*cannot be recorded"
    ):
        trace_model(model, make_docs(2), None, tmp_path / "s", seq_len=16, progress=False)
    assert not (tmp_path / "s").exists()


def test_model_class_override_and_bad_class(tmp_path: Path, mixtral_dir: Path) -> None:
    m = load_model(mixtral_dir, model_class="MixtralModel")
    assert type(m).__name__ == "MixtralModel"
    st = trace_model(
        mixtral_dir,
        make_docs(2),
        None,
        tmp_path / "s",
        seq_len=16,
        progress=False,
        model_class="MixtralModel",
    )
    ref = trace_model(mixtral_dir, make_docs(2), None, tmp_path / "r", seq_len=16, progress=False)
    assert (st.load().expert_ids == ref.load().expert_ids).all()
    with pytest.raises(ModelError, match="--model-class 'NoSuchModel'"):
        load_model(mixtral_dir, model_class="NoSuchModel")


def test_float32_logits_are_exact_and_float16_within_its_rounding(
    tmp_path: Path, mixtral_dir: Path
) -> None:
    docs = make_docs(3)
    kw = dict(seq_len=16, batch_size=2, progress=False, bos_token_id=2)
    f32 = trace_model(mixtral_dir, docs, None, tmp_path / "a", logits_dtype="float32", **kw)
    f16 = trace_model(mixtral_dir, docs, None, tmp_path / "b", **kw)
    assert f32.meta.extra["logits_dtype"] == "float32"
    a, b = f32.load().logits, f16.load().logits
    np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))
    err = np.abs(a - b)
    assert err.max() <= np.abs(a).max() * 2.0**-11 + 1e-7 and err.max() > 0
    assert a.dtype == np.float32
    with pytest.raises(Exception, match="float16 or float32"):
        trace_model(mixtral_dir, docs, None, tmp_path / "c", logits_dtype="bf16", **kw)


def test_hash_routed_layer_is_traced_from_the_token_table(tmp_path: Path) -> None:
    """DeepSeek-V4 hash layers pick experts by tid2eid[token]: the trace shows exactly that."""
    mdir = build_tiny("deepseek_v4", tmp_path / "m")
    model = load_model(mdir)
    layer = next(i for i, blk in enumerate(model.model.layers) if hasattr(blk.mlp.gate, "tid2eid"))
    table = model.model.layers[layer].mlp.gate.tid2eid
    st = trace_model(mdir, make_docs(3), None, tmp_path / "t", seq_len=16, progress=False)
    tr = st.load()
    li = st.meta.layer_indices.index(layer)
    np.testing.assert_array_equal(tr.expert_ids[:, li], table[tr.token_id].numpy())
    assert st.meta.num_layers == len(model.model.layers)  # no layer left out


def test_switch_drops_keep_the_intended_expert_and_round_trip(tmp_path: Path) -> None:
    """Capacity-dropped Switch tokens: intended expert (router argmax), weight 0, d{l}_{j}
    flag; the store verifies, loads the flags and SQL sees the column."""
    from moelab.trace.store import verify_store

    mdir = build_tiny("switch_transformers", tmp_path / "m")  # expert_capacity 4
    st = trace_model(
        mdir,
        make_docs(3, max_len=30),
        None,
        tmp_path / "t",
        seq_len=16,
        batch_size=2,
        progress=False,
    )
    assert st.meta.extra["dropped"] is True
    assert st.meta.extra["decoder_input"].startswith("shifted-right")
    tr = st.load()
    assert tr.dropped is not None and tr.dropped.any() and (~tr.dropped).any()
    assert (tr.weights[tr.dropped] == 0).all() and (tr.weights[~tr.dropped] > 0).all()
    top1 = tr.logits.argmax(-1)[..., None]  # Switch routes top-1 of its logits
    np.testing.assert_array_equal(tr.expert_ids, top1)
    assert verify_store(tmp_path / "t").ok
    n = st.sql("SELECT count(*) FROM trace WHERE d0_0").fetchall()[0][0]
    assert n == int(tr.dropped[:, 0, 0].sum())
