"""Every adapter family records exactly what the model's own router outputs give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trace_tiny as tiny
from trace_testutil import make_docs

from moelab.trace.api import iter_batches, load_model, make_batch, plan_chunks, trace_model
from moelab.trace.schema import NO_EXPERT

SEQ, BATCH = 16, 3
FAMILIES = list(tiny.configs())


def reference(model, docs) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per-layer logits from output_router_logits=True and (ids, weights) from independent hooks."""
    plan = plan_chunks(docs, lambda t: [], 2, SEQ, None, 0, 1, ["prose", "code"], None)
    mtype = model.config.model_type
    captured: list = []
    routers = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 2)
        if name.endswith(("mlp.gate", "mlp.router", "block_sparse_moe.router")) and len(leaf) > 1:
            routers.append(mod)
    hooks = [r.register_forward_hook(lambda m, a, o: captured.append(o)) for r in routers]
    logits, ids, ws = [], [], []
    try:
        for batch in iter_batches(plan.chunks, BATCH):
            inp, mask, _, sel = make_batch(batch, torch.device("cpu"))
            captured.clear()
            with torch.no_grad():
                if mtype == "switch_transformers":
                    # teacher forcing: the decoder sees the targets shifted right (start = pad 0)
                    shifted = torch.cat([torch.zeros_like(inp[:, :1]), inp[:, :-1]], dim=1)
                    o = model(
                        input_ids=inp,
                        attention_mask=mask,
                        decoder_input_ids=shifted,
                        decoder_attention_mask=mask,
                        output_router_logits=True,
                    )
                    lg = list(o.encoder_router_logits + o.decoder_router_logits)
                else:
                    o = model(input_ids=inp, attention_mask=mask, output_router_logits=True)
                    lg = list(o.router_logits)
                    if mtype == "jetmoe":
                        # router_logits also holds the attention mixture's gating calls, and how
                        # many per layer differs between transformers releases (2 in 5.23, 1 in
                        # 5.24): keep the entries that are the MLP routers' own logits tensors.
                        mlp = [out[4] for out in captured]
                        lg = [t for t in lg if any(t is m for m in mlp)]
                        assert len(lg) == len(mlp) == len(routers)
            E = lg[0].shape[-1]
            logits.append(np.stack([x.reshape(-1, E)[sel].float().numpy() for x in lg], 1))
            bi, bw = [], []
            for out in captured:
                if mtype == "switch_transformers":
                    onehot, probs, _ = out
                    i = onehot.reshape(-1, E).argmax(-1, keepdim=True)
                    w = probs.reshape(-1, 1)
                elif mtype == "jetmoe":
                    index_sorted, _, gates, sizes, _lg = out
                    T = _lg.shape[0]
                    i = torch.empty(index_sorted.numel(), dtype=torch.long)
                    i[index_sorted] = torch.repeat_interleave(torch.arange(E), torch.tensor(sizes))
                    w = torch.empty(index_sorted.numel())
                    w[index_sorted] = gates
                    i, w = i.view(T, -1), w.view(T, -1)
                else:
                    i, w = out[2], out[1]
                bi.append(i[sel].numpy())
                bw.append(w[sel].float().numpy())
            ids.append(np.stack(bi, 1))
            ws.append(np.stack(bw, 1))
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(logits), np.concatenate(ids), np.concatenate(ws)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_model_router_outputs(family: str, tmp_path: Path) -> None:
    check_family(family, tmp_path)


def check_family(family: str, tmp_path: Path) -> None:
    """Trace a tiny saved model of `family` and compare with its own router outputs."""
    mdir = tiny.build(family, tmp_path / "model")
    docs = make_docs(5, seed=1)
    store = trace_model(
        mdir,
        docs,
        None,
        tmp_path / "trace",
        seq_len=SEQ,
        batch_size=BATCH,
        shard_tokens=40,
        bos_token_id=2,
        hidden_rate=1.0,
        progress=False,
    )
    tr = store.load()
    assert store.meta.family == family
    model = load_model(mdir)
    ref_logits, ref_ids, ref_w = reference(model, docs)
    n_tokens = sum(len(d.token_ids) + 1 for d in docs)
    assert tr.num_tokens == n_tokens == ref_ids.shape[0]
    # logits: exactly the model's own router_logits (as stored, float16)
    np.testing.assert_array_equal(tr.logits, ref_logits.astype(np.float16).astype(np.float32))
    # ids and weights: exactly the router modules' outputs
    np.testing.assert_array_equal(tr.expert_ids, ref_ids)
    np.testing.assert_array_equal(tr.weights, ref_w.astype(np.float16).astype(np.float32))
    assert (tr.expert_ids != NO_EXPERT).all()
    # semantic check: the chosen experts are the top-k of the selection scores
    gs = store.gates()
    for li in range(tr.meta.num_layers):
        h = tr.hidden["router_input"][:, li].astype(np.float32)
        lg = gs.logits(li, h)
        assert np.abs(lg - tr.logits[tr.hidden_rows, li]).max() < 0.05  # fp16 hidden states
        if store.meta.score_fn == "sigmoid":
            continue  # sigmoid + selection bias, group-limited selection
        scores = ref_logits[:, li]
        top = np.sort(np.argsort(-scores, axis=1)[:, : tr.meta.top_k], axis=1)
        np.testing.assert_array_equal(np.sort(tr.expert_ids[:, li], axis=1), top)
    # BOS flagged once per document at position 0; positions continue across chunks
    assert tr.is_bos.sum() == len(docs) and (tr.position[tr.is_bos] == 0).all()
    assert tr.position.max() == max(len(d.token_ids) for d in docs)  # longer than SEQ: chunked
    assert (tr.prev_row()[~tr.is_bos] >= 0).all()


def test_deepseek_only_moe_layers_and_selection_bias(tmp_path: Path) -> None:
    mdir = tiny.build("deepseek_v3", tmp_path / "model")
    store = trace_model(mdir, make_docs(3), None, tmp_path / "t", seq_len=SEQ, progress=False)
    assert store.meta.layer_indices == [1, 2]  # first_k_dense_replace = 1
    assert store.meta.score_fn == "sigmoid"
    model = load_model(mdir)
    gs = store.gates()
    for li, layer in enumerate((1, 2)):
        bias = model.model.layers[layer].mlp.gate.e_score_correction_bias.numpy()
        np.testing.assert_array_equal(gs.selection_bias[li], bias)
        np.testing.assert_array_equal(
            gs.norm_weight[li],
            model.model.layers[layer].post_attention_layernorm.weight.detach().numpy(),
        )


def test_switch_layer_groups(tmp_path: Path) -> None:
    mdir = tiny.build("switch_transformers", tmp_path / "model")
    store = trace_model(mdir, make_docs(3), None, tmp_path / "t", seq_len=SEQ, progress=False)
    assert store.meta.extra["layer_groups"] == ["encoder", "decoder"]
    assert store.meta.layer_indices == [1, 3]
    assert store.meta.top_k == 1
