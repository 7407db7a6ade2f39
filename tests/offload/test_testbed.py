"""The offload testbed builder on a tiny shape: files, held-out routing, resumable, refusals."""

import argparse

import numpy as np
import pytest
import torch
from offload_models import tiny_model

from moelab.errors import ConfigError, OffloadError
from moelab.offload.testbed import (
    TESTBED_SHAPE,
    TINY_SHAPE,
    TINY_WIDEN,
    build_testbed,
    load_testbed,
    record_routing,
    widen_model,
)


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    return build_testbed(root, steps=2, shape=TINY_SHAPE,
        widen=TINY_WIDEN, corpus=argparse.__file__, max_bytes=None, heldout_windows=3,
                         progress=False)  # fmt: skip


def test_testbed_files_and_routing(tb):
    S, L, k, D = (
        TINY_SHAPE["seq_len"],
        TINY_SHAPE["n_layers"],
        TINY_SHAPE["top_k"],
        TINY_SHAPE["d_model"] * TINY_WIDEN["factor"],
    )
    assert tb.tokens.shape == (3, S)
    assert tb.expert_ids.shape == (3 * S, L, k)
    assert tb.router_input.shape == (3 * S, L, D)
    assert (tb.expert_ids >= 0).all() and (tb.expert_ids < TINY_SHAPE["num_experts"]).all()
    assert tb.info["steps"] == 2 and tb.info["heldout"]["split"] == "test"
    assert tb.info["expert_bytes_fp32"] == 3 * 64 * 96 * 4  # widened: d_model 64, hidden 96
    assert tb.info["widen_max_rel_logit_diff"] < 1e-5
    big = tb.load_model()
    assert big.cfg.d_model == 64 and big.cfg.n_heads == 8 and big.cfg.moe.d_ff == 96
    ids, x = record_routing(tb.load_model(), tb.tokens)  # deterministic: same routing again
    assert np.array_equal(ids, tb.expert_ids)
    assert np.allclose(x, tb.router_input.astype(np.float32), atol=1e-2)
    again = load_testbed(tb.root)
    assert np.array_equal(again.tokens, tb.tokens)


def test_rebuild_resumes_without_retraining(tb):
    again = build_testbed(tb.root, steps=2, shape=TINY_SHAPE,
        widen=TINY_WIDEN, corpus=argparse.__file__, max_bytes=None, heldout_windows=3,
                          progress=False)  # fmt: skip
    assert np.array_equal(again.expert_ids, tb.expert_ids)


def test_widening_preserves_the_function():

    m = tiny_model(seed=3)  # d_model 32, 8 experts of hidden 64, top-2
    big = widen_model(m, 3, 150)
    assert big.cfg.d_model == 96 and big.cfg.n_heads == 12 and big.cfg.moe.d_ff == 150
    assert big.blocks[0].ffn.experts.gate_up_proj.shape == (8, 300, 96)
    x = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m(x), big(x)
    assert torch.allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5 * float(a.logits.abs().max()))
    for ra, rb in zip(a.routing, b.routing, strict=True):
        assert torch.equal(ra.expert_ids, rb.expert_ids)
    with pytest.raises(ConfigError, match="factor"):
        widen_model(m, 0, 150)


def test_default_shape_is_large_expert():
    s = TESTBED_SHAPE
    expert = 3 * s["d_model"] * s["d_ff"] * 4
    assert expert > 8e6 and expert * s["num_experts"] * s["n_layers"] > 2.5e8  # ~277 MB of experts


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="steps"):
        build_testbed(tmp_path, steps=0, shape=TINY_SHAPE)
    with pytest.raises(ConfigError, match="unknown shape"):
        build_testbed(tmp_path, steps=1, shape={"d_modle": 8})
    with pytest.raises(OffloadError, match="not a built testbed"):
        load_testbed(tmp_path)
