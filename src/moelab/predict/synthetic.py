"""Synthetic routing traces with real structure, for testing and benchmarking predictors.

Tokens follow a sparse first-order Markov chain over a Zipf-distributed vocabulary. Each token
gets a random embedding; the residual stream r_0 = emb(token) + c * (sum of the previous 2
tokens' embeddings) (c = `context_weight`: how much routing depends on context, not the id) evolves as r_{l+1} = r_l + 0.6 * tanh(A_l r_l) (so nearby layers are similar, distant
ones drift). The router input is x_l = RMSNorm(r_l + 0.3 * c_l) * g_l (c_l: a context mix that
plays the attention output) and layer l routes with top-k of softmax(W_l x_l), where
W_{l+1} = 0.6 W_l + 0.8 N(0, 1) / sqrt(D): correlated routers, as in trained MoE models. The
gates are returned as a GateSet, so gate lookahead and the d = 0 check have exact references.
"""

from __future__ import annotations

import numpy as np

from moelab.errors import ConfigError
from moelab.trace.gates import GateSet
from moelab.trace.schema import Trace, TraceMeta


def _rms(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def make_synthetic_trace(
    num_docs: int = 40,
    doc_len: int = 64,
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    d_model: int = 32,
    vocab: int = 200,
    hidden_rate: float = 1.0,
    residual: bool = True,
    logits: bool = True,
    context_weight: float = 0.25,
    seed: int = 0,
) -> tuple[Trace, GateSet]:
    """A Trace (with hidden side store for a `hidden_rate` share of rows) and its GateSet."""
    if (
        min(num_docs, doc_len, num_layers, num_experts, top_k, d_model, vocab) < 1
        or top_k > num_experts
    ):
        raise ConfigError("make_synthetic_trace: sizes must be >= 1 and top_k <= num_experts")
    if not 0.0 <= hidden_rate <= 1.0:
        raise ConfigError(f"make_synthetic_trace: hidden_rate={hidden_rate} must be in [0, 1]")
    rng = np.random.default_rng(seed)
    eps = 1e-6
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    zipf /= zipf.sum()
    succ = rng.choice(vocab, size=(vocab, 4), p=zipf)
    ids_list = []
    for _ in range(num_docs):
        t = [int(rng.choice(vocab, p=zipf))]
        for _ in range(doc_len - 1):
            t.append(
                int(succ[t[-1], rng.integers(4)])
                if rng.random() < 0.7
                else int(rng.choice(vocab, p=zipf))
            )
        ids_list.append(t)
    token_id = np.array(ids_list, np.int64).ravel()
    n = token_id.size
    doc_id = np.repeat(np.arange(num_docs, dtype=np.int64), doc_len)
    position = np.tile(np.arange(doc_len, dtype=np.int32), num_docs)

    emb = rng.normal(size=(vocab, d_model)).astype(np.float32)
    e = emb[token_id].reshape(num_docs, doc_len, d_model)
    ctx = np.zeros_like(e)
    ctx[:, 1:] += e[:, :-1]
    ctx[:, 2:] += e[:, :-2]
    r = (e + context_weight * ctx).reshape(n, d_model)
    ctx = ctx.reshape(n, d_model)

    w = [rng.normal(size=(num_experts, d_model)).astype(np.float32) / np.sqrt(d_model)]
    for _ in range(num_layers - 1):
        w.append(
            (0.6 * w[-1] + 0.8 * rng.normal(size=w[-1].shape) / np.sqrt(d_model)).astype(np.float32)
        )
    w = [x * 4.0 for x in w]
    norm_w = [(1.0 + 0.1 * rng.normal(size=d_model)).astype(np.float32) for _ in range(num_layers)]
    gates = GateSet(weights=w, norm_weight=norm_w, score_fn="softmax", norm_eps=eps, top_k=top_k)

    router_in = np.zeros((n, num_layers, d_model), np.float32)
    resid = np.zeros((n, num_layers, d_model), np.float32)
    expert_ids = np.zeros((n, num_layers, top_k), np.int16)
    weights = np.zeros((n, num_layers, top_k), np.float32)
    all_logits = np.zeros((n, num_layers, num_experts), np.float32)
    mix = rng.normal(size=(num_layers, d_model, d_model)).astype(np.float32) / np.sqrt(d_model)
    for layer in range(num_layers):
        resid[:, layer] = r
        x = gates.normalize(layer, r + 0.3 * ctx @ mix[layer])
        router_in[:, layer] = x
        lg = gates.logits(layer, x)
        s = gates.scores(layer, x)
        top = np.argsort(-s, axis=1, kind="stable")[:, :top_k]
        p = np.take_along_axis(s, top, 1)
        expert_ids[:, layer] = top
        weights[:, layer] = p / p.sum(1, keepdims=True)
        all_logits[:, layer] = lg
        a = rng.normal(size=(d_model, d_model)).astype(np.float32) / np.sqrt(d_model)
        r = r + 0.6 * np.tanh(r @ a)

    hrows = np.sort(rng.choice(n, size=int(round(hidden_rate * n)), replace=False)).astype(np.int64)
    hidden = {}
    if hrows.size:
        hidden["router_input"] = router_in[hrows]
        if residual:
            hidden["residual"] = resid[hrows]
    meta = TraceMeta(
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        layer_indices=list(range(num_layers)),
        model="synthetic",
        family="synthetic",
        corpus="synthetic-markov",
        split="all",
        domains=["synthetic"],
        d_model=d_model,
        extra={"seed": seed},
    )
    trace = Trace(
        meta=meta,
        token_id=token_id,
        doc_id=doc_id,
        position=position,
        domain=np.zeros(n, np.int16),
        is_bos=position == 0,
        expert_ids=expert_ids,
        weights=weights,
        logits=all_logits if logits else None,
        hidden=hidden,
        hidden_rows=hrows if hidden else None,
    )
    return trace, gates
