"""moelab's own MoETransformer: traced routing equals ModelOutput.routing on the same batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from trace_testutil import build_moelab, make_docs

from moelab.models.transformer import MoETransformer
from moelab.trace.adapters import MoelabAdapter, get_adapter
from moelab.trace.api import iter_batches, make_batch, plan_chunks, trace_model


def test_moelab_matches_model_routing(tmp_path: Path) -> None:
    ckpt = build_moelab(tmp_path)
    docs = make_docs(5, seed=2)
    store = trace_model(
        ckpt,
        docs,
        None,
        tmp_path / "t",
        seq_len=16,
        batch_size=2,
        hidden_rate=1.0,
        hidden_points=("router_input", "residual"),
        progress=False,
    )
    tr = store.load()
    assert store.meta.family == "moelab" and store.meta.layer_indices == [1, 2]
    model = MoETransformer.load(ckpt)
    assert isinstance(get_adapter(model), MoelabAdapter)
    plan = plan_chunks(docs, lambda t: [], 2, 16, None, 0, 1, ["prose", "code"], None)
    ids, ws, lgs = [], [], []
    for batch in iter_batches(plan.chunks, 2):
        inp, mask, _, sel = make_batch(batch, torch.device("cpu"))
        with torch.no_grad():
            out = model(inp, attention_mask=mask)
        rs = [r for r in out.routing if r is not None]
        ids.append(np.stack([r.expert_ids[sel].numpy() for r in rs], 1))
        ws.append(np.stack([r.weights[sel].float().numpy() for r in rs], 1))
        lgs.append(np.stack([r.logits[sel].float().numpy() for r in rs], 1))
    np.testing.assert_array_equal(tr.expert_ids, np.concatenate(ids))
    np.testing.assert_array_equal(
        tr.weights, np.concatenate(ws).astype(np.float16).astype(np.float32)
    )
    np.testing.assert_array_equal(
        tr.logits, np.concatenate(lgs).astype(np.float16).astype(np.float32)
    )
    # gates: router input hidden states reproduce the logits; residual -> norm -> router input
    gs = store.gates()
    for li in range(2):
        h = tr.hidden["router_input"][:, li].astype(np.float32)
        assert np.abs(gs.logits(li, h) - tr.logits[tr.hidden_rows, li]).max() < 0.02
        blk = model.blocks[store.meta.layer_indices[li]]
        np.testing.assert_array_equal(gs.norm_weight[li], blk.ffn_norm.weight.detach().numpy())
    assert tr.hidden["residual"].shape == tr.hidden["router_input"].shape
    # layer-0 residual is the embedding of the token: check against the embedding table
    emb = model.embed_tokens.weight.detach().numpy()
    tok = tr.token_id[tr.hidden_rows]
    blk0 = store.meta.layer_indices[0]
    if blk0 == 0:
        np.testing.assert_allclose(tr.hidden["residual"][:, 0], emb[tok], atol=1e-3)
    assert tr.hidden["residual"][:, 0].std() > 0


def test_selection_bias_is_traced_and_exported_with_the_gates(tmp_path: Path) -> None:
    """A topk router with an aux-loss-free selection bias: the trace records its biased choice,
    and gates.safetensors carries the bias so gate lookahead reproduces that choice."""
    import dataclasses

    model = MoETransformer.load(build_moelab(tmp_path))
    cfg = dataclasses.replace(
        model.cfg, moe=dataclasses.replace(model.cfg.moe, bias_update_rate=1e-3)
    )
    biased = MoETransformer(cfg, seed=0)
    biased.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for b in biased.blocks:
            if b.is_moe:
                b.ffn.router.selection_bias.copy_(torch.linspace(0.3, -0.3, 6))
    ckpt = biased.save(tmp_path / "biased")
    store = trace_model(
        ckpt, make_docs(4, seed=3), None, tmp_path / "t", seq_len=16, batch_size=2,
        hidden_rate=1.0, progress=False,
    )  # fmt: skip
    tr, gs = store.load(), store.gates()
    plain = trace_model(
        build_moelab(tmp_path / "p"), make_docs(4, seed=3), None, tmp_path / "tp", seq_len=16,
        batch_size=2, progress=False,
    ).load()  # fmt: skip
    assert (tr.expert_ids != plain.expert_ids).any()  # the bias changed the choice
    for li in range(2):
        np.testing.assert_allclose(gs.selection_bias[li], np.linspace(0.3, -0.3, 6), atol=1e-6)
        h = tr.hidden["router_input"][:, li].astype(np.float32)
        pick = np.sort(np.argsort(-gs.scores(li, h), axis=1)[:, :2], axis=1)
        agree = (pick == np.sort(tr.expert_ids[tr.hidden_rows, li], axis=1)).all(1).mean()
        assert agree > 0.97  # fp16 hidden states may flip near-ties


def test_expert_choice_slots_and_unchosen_tokens(tmp_path: Path) -> None:
    """Expert choice (Zhou et al. 2022): one slot per expert, NO_EXPERT where the expert did not
    pick the token; equal to the model's own RoutingResult."""
    from moelab.layers.config import MoEConfig
    from moelab.models.config import MoETransformerConfig
    from moelab.trace.schema import NO_EXPERT

    cfg = MoETransformerConfig(
        vocab_size=300,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=64,
        moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, router="expert_choice"),
        bos_token_id=2,
    )
    ckpt = MoETransformer(cfg, seed=0).save(tmp_path / "ec")
    docs = make_docs(3, seed=1)
    store = trace_model(ckpt, docs, None, tmp_path / "t", seq_len=16, batch_size=2, progress=False)
    tr = store.load()
    assert store.meta.top_k == 4 and not store.meta.extra["dropped"]
    real = tr.expert_ids != NO_EXPERT
    slots = np.broadcast_to(np.arange(4), tr.expert_ids.shape)
    assert (tr.expert_ids[real] == slots[real]).all() and (tr.weights[~real] == 0).all()
    assert real.any() and (~real).any()
    model = MoETransformer.load(ckpt)
    plan = plan_chunks(docs, lambda t: [], 2, 16, None, 0, 1, ["prose", "code"], None)
    ref = []
    for batch in iter_batches(plan.chunks, 2):
        inp, mask, _, sel = make_batch(batch, torch.device("cpu"))
        with torch.no_grad():
            out = model(inp, attention_mask=mask)
        rs = [r for r in out.routing if r is not None]
        ref.append(np.stack([r.expert_ids.masked_fill(r.dropped, NO_EXPERT)[sel] for r in rs], 1))
    np.testing.assert_array_equal(tr.expert_ids, np.concatenate(ref))
