"""`moefy()` and `upcycle()`: the Python entry points behind `moelab moefy` / `moelab upcycle`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from moelab._io import atomic_write_json
from moelab.data.corpora import load_corpus
from moelab.data.splits import split_documents
from moelab.errors import InputError
from moelab.moefy.build import (
    ffn_compute_fraction,
    moefy_dense,
    perplexity,
    save_moefied,
    set_top_k,
    token_blocks,
)
from moelab.moefy.convert import dense_to_moelab, load_dense_lm


def encode_docs(tokenizer, docs, max_tokens: int | None = None) -> list[int]:
    """Concatenate documents' token ids (EOS between documents) up to max_tokens."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d.text)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids


def domain_balanced_blocks(
    tokenizer, docs, max_tokens: int, seq_len: int, seed: int = 0
) -> list[torch.Tensor]:
    """[seq_len] token blocks drawn in equal shares from every domain of `docs` (at most
    max_tokens in all), in seeded shuffled order.

    Splits list their documents domain by domain, so the first N tokens of a split would all come
    from one domain; routers, calibration and fine-tuning must see every domain, and the held-out
    tail of the blocks must cover them all.
    """
    by_domain: dict[str, list] = {}
    for d in docs:
        by_domain.setdefault(d.domain, []).append(d)
    if not by_domain:
        raise InputError("moefy: the corpus split has no documents")
    share = max(seq_len, max_tokens // len(by_domain))
    blocks: list[torch.Tensor] = []
    for _, ds in sorted(by_domain.items()):
        ids = encode_docs(tokenizer, ds, share)
        n = min(len(ids), share) // seq_len
        if n:
            blocks.extend(torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len))
    if not blocks:
        raise InputError(
            f"moefy: no domain has {seq_len} tokens of text (use a larger corpus or a smaller "
            "--seq-len)"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return [blocks[int(i)] for i in order]


def quality_report(
    dense,
    moe,
    tokenizer,
    test_docs,
    ks: tuple[int, ...] = (1, 2, 4),
    seq_len: int = 256,
    eval_tokens: int = 2048,
) -> dict:
    """Held-out perplexity per domain: dense vs the MoEfied model at each k (test split)."""
    by_domain: dict[str, list] = {}
    for d in test_docs:
        by_domain.setdefault(d.domain, []).append(d)
    k0 = moe.cfg.moe.top_k
    out: dict = {"split": "test", "seq_len": seq_len, "domains": {}}
    for dom, docs in sorted(by_domain.items()):
        ids = encode_docs(tokenizer, docs, eval_tokens)
        if len(ids) < seq_len:
            continue
        blocks = token_blocks(ids, seq_len, eval_tokens)
        row = {"tokens": len(blocks) * seq_len, "dense": perplexity(dense, blocks)}
        for k in ks:
            if k <= moe.cfg.moe.num_experts:
                set_top_k(moe, k)
                row[f"k={k}"] = perplexity(moe, blocks)
        out["domains"][dom] = row
    set_top_k(moe, k0)
    return out


def moefy(
    model: str | Path,
    out: str | Path,
    gguf_file: str | None = None,
    experts: int = 8,
    top_k: int = 2,
    method: str = "cluster",
    router_tokens: int = 100_000,
    corpus: str = "default",
    corpus_bytes: int | None = 4_000_000,
    seq_len: int = 256,
    eval_tokens: int = 2048,
    seed: int = 0,
    device: str = "cpu",
    calibrate: bool = True,
    dense_layers: int = 0,
    ridge: float = 5e-2,
    distill_steps: int = 0,
    distill_minutes: float | None = None,
    distill_lr: float = 5e-5,
) -> dict:
    """MoEfy a local dense Llama-family LM; save a moelab model + quality report in `out`.

    With calibrate (default) the model is calibrated for top_k and the report covers that k only;
    without it the split is training-free apart from the routers and k = 1, 2, 4 are reported.
    distill_steps > 0 then trains the experts to match the dense model (moefy/distill.py) on the
    same training-split blocks, and the report gives perplexity before and after.
    """
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    hf, tok = load_dense_lm(model, gguf_file)
    dense = dense_to_moelab(hf, max_seq_len=max(seq_len, 512)).to(device)
    hf_config = hf.config
    del hf
    docs = load_corpus(corpus, max_bytes=corpus_bytes, seed=seed)
    splits = split_documents(docs, seed=seed)
    train = domain_balanced_blocks(tok, splits["train"], router_tokens, seq_len, seed)
    blocks = [b.to(device) for b in train]
    moe, report = moefy_dense(
        dense,
        hf_config,
        blocks,
        experts,
        top_k,
        method,
        seed,
        calibrate=calibrate,
        dense_layers=dense_layers,
        ridge=ridge,
    )
    ks = (top_k,) if calibrate else tuple(k for k in (1, 2, 4) if k <= experts)
    quality = quality_report(
        dense, moe, tok, splits["test"], ks, seq_len=seq_len, eval_tokens=eval_tokens
    )
    distilled = None
    if distill_steps > 0:
        from moelab.moefy.distill import distill

        t1 = time.perf_counter()
        log = distill(moe, dense, blocks, distill_steps, distill_lr, max_minutes=distill_minutes)
        secs = time.perf_counter() - t1
        distilled = {
            "steps_done": len(log),
            "tokens": len(log) * 2 * seq_len,
            "seconds": round(secs, 1),
            "kl_first": log[0]["kl"],
            "kl_last": log[-1]["kl"],
            "quality_before": quality,
        }
        quality = quality_report(
            dense, moe, tok, splits["test"], ks, seq_len=seq_len, eval_tokens=eval_tokens
        )
    out = save_moefied(moe, report, tok, out)
    summary = {
        "model": str(model),
        "gguf_file": gguf_file,
        "method": method,
        "experts": experts,
        "top_k": top_k,
        "router_tokens": report.router_tokens,
        "calibrated": calibrate,
        "dense_layers": dense_layers,
        "ffn_compute_fraction": {f"k={k}": ffn_compute_fraction(moe, k) for k in ks},
        "calibration_rel_err_mean": report.mean_calibration(),
        "router_recall_mean": {str(k): v for k, v in report.mean_router_recall().items()},
        "quality": quality,
        "distilled": distilled,
        "seconds": round(time.perf_counter() - t0, 1),
        "out": str(out),
    }
    atomic_write_json(Path(out) / "quality.json", summary)
    return summary


def load_summary(out: str | Path) -> dict:
    """Read a moefy run's quality.json."""
    return json.loads((Path(out) / "quality.json").read_text())


def upcycle(
    model: str | Path,
    out: str | Path,
    gguf_file: str | None = None,
    experts: int = 8,
    top_k: int = 2,
    steps: int = 50,
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 256,
    train_tokens: int = 200_000,
    corpus: str = "default",
    corpus_bytes: int | None = 4_000_000,
    max_minutes: float | None = None,
    eval_tokens: int = 2048,
    seed: int = 0,
) -> dict:
    """Sparse-upcycle a local dense Llama-family LM and continue training briefly."""
    from moelab.moefy.upcycle import continue_training, save_upcycled, upcycle_dense

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    hf, tok = load_dense_lm(model, gguf_file)
    dense = dense_to_moelab(hf, max_seq_len=max(seq_len, 512))
    hf_config = hf.config
    del hf
    docs = load_corpus(corpus, max_bytes=corpus_bytes, seed=seed)
    splits = split_documents(docs, seed=seed)
    blocks = domain_balanced_blocks(tok, splits["train"], train_tokens, seq_len, seed)
    moe = upcycle_dense(dense, hf_config, experts, top_k, seed)
    heldout = domain_balanced_blocks(tok, splits["test"], eval_tokens, seq_len, seed)
    ppl_dense = perplexity(dense, heldout)
    ppl_step0 = perplexity(moe, heldout)
    t1 = time.perf_counter()
    log = continue_training(moe, blocks, steps, lr, batch_size, max_minutes, seed)
    train_s = time.perf_counter() - t1
    info = {
        "model": str(model),
        "experts": experts,
        "top_k": top_k,
        "steps_done": len(log),
        "train_seconds": round(train_s, 1),
        "tokens_per_second": round(len(log) * batch_size * seq_len / max(train_s, 1e-9), 1),
        "heldout_perplexity": {
            "split": "test",
            "dense": ppl_dense,
            "upcycled_step0": ppl_step0,
            "upcycled_final": perplexity(moe, heldout),
        },
        "total_params": moe.stats().total_params,
        "active_params": moe.stats().active_params,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    save_upcycled(moe, log, tok, out, info)
    return info
