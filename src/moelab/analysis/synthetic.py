"""Synthetic traces with controllable structure, for tests and benchmarks of the analyses.

Router logits are a token-id term (token preference), a term carried from the previous layer
(layer chaining) and Gaussian noise; the top-k experts and their softmax-renormalised weights are
taken from those logits exactly as Mixtral-style top-k routing does (Jiang et al. 2024, Eq. 1-2).
"""

from __future__ import annotations

import numpy as np

from moelab.errors import ConfigError
from moelab.trace.schema import Trace, TraceMeta


def synthetic_trace(
    n_tokens: int = 10_000,
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    vocab: int = 500,
    doc_len: int = 200,
    n_domains: int = 3,
    token_strength: float = 1.0,
    chain_strength: float = 0.5,
    domain_strength: float = 0.5,
    logits: bool = True,
    seed: int = 0,
) -> Trace:
    """A Trace of `n_tokens` rows in documents of `doc_len` (first row of each is BOS), Zipf
    token ids, and top-k routing from structured random logits."""
    if n_tokens < 1 or num_layers < 1 or not 1 <= top_k <= num_experts:
        raise ConfigError(
            f"synthetic_trace: n_tokens={n_tokens}, num_layers={num_layers}, top_k={top_k},"
            f" num_experts={num_experts}; expected positive sizes and 1 <= top_k <= num_experts"
        )
    rng = np.random.default_rng(seed)
    doc_id = np.arange(n_tokens, dtype=np.int64) // doc_len
    position = (np.arange(n_tokens) % doc_len).astype(np.int32)
    is_bos = position == 0
    ranks = np.arange(1, vocab + 1)
    p = 1.0 / ranks
    token_id = rng.choice(vocab, size=n_tokens, p=p / p.sum()).astype(np.int64)
    token_id[is_bos] = 0
    n_docs = int(doc_id[-1]) + 1
    doc_domain = rng.integers(0, max(n_domains, 1), size=n_docs).astype(np.int16)
    domain = doc_domain[doc_id]
    expert_ids = np.empty((n_tokens, num_layers, top_k), dtype=np.int16)
    weights = np.empty((n_tokens, num_layers, top_k), dtype=np.float32)
    all_logits = np.empty((n_tokens, num_layers, num_experts), dtype=np.float32) if logits else None
    prev = np.zeros((n_tokens, num_experts), dtype=np.float32)
    for layer in range(num_layers):
        tok_emb = rng.standard_normal((vocab, num_experts)).astype(np.float32)
        dom_emb = rng.standard_normal((max(n_domains, 1), num_experts)).astype(np.float32)
        lg = rng.standard_normal((n_tokens, num_experts), dtype=np.float32)
        lg += token_strength * tok_emb[token_id]
        lg += domain_strength * dom_emb[domain]
        if layer > 0:
            lg += chain_strength * prev
        if all_logits is not None:
            all_logits[:, layer, :] = lg
        if top_k < num_experts:
            part = np.argpartition(-lg, top_k - 1, axis=1)[:, :top_k]
        else:
            part = np.tile(np.arange(num_experts), (n_tokens, 1))
        vals = np.take_along_axis(lg, part, axis=1)
        order = np.argsort(-vals, axis=1)
        ids = np.take_along_axis(part, order, axis=1)
        v = np.take_along_axis(vals, order, axis=1)
        w = np.exp(v - v[:, :1])
        expert_ids[:, layer, :] = ids
        weights[:, layer, :] = w / w.sum(axis=1, keepdims=True)
        prev = lg
    meta = TraceMeta(
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        layer_indices=list(range(num_layers)),
        model="synthetic",
        family="synthetic",
        domains=[f"domain{i}" for i in range(max(n_domains, 1))],
    )
    return Trace(
        meta=meta,
        token_id=token_id,
        doc_id=doc_id,
        position=position,
        domain=domain,
        is_bos=is_bos,
        expert_ids=expert_ids,
        weights=weights,
        logits=all_logits,
    )
