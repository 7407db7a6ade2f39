"""Held-out evaluation sample and per-domain next-token loss with standard errors over sequences.

The sample is a fixed set of `seq_len` blocks cut from a named split of a prepared data folder
(`moelab train`'s ``data/``), evenly spaced over the split so every domain and document range is
covered (``moelab.data.dataset.pack_blocks``). Every target token keeps its domain; targets that
start a new document (position 0, the ``<bos>`` across a document boundary) are not scored.

Uncertainty: a loss (or a loss change between two models on the same sample) per domain is a
ratio of sums over sequences, sum_i s_i / sum_i n_i; its standard error is the cluster-robust
(linearised ratio-estimator) one over the B sequences, sqrt(B/(B-1) sum_i (s_i - r n_i)^2) /
sum_i n_i (Cochran 1977, "Sampling Techniques", Sec. 6.4), which respects that tokens of one
sequence are correlated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moelab.data.dataset import PackedBlocks, pack_blocks
from moelab.errors import DataError, InputError

__all__ = [
    "EvalSample",
    "load_sample",
    "sample_from_blocks",
    "forward_logits",
    "sequence_sums",
    "block_inputs",
    "logit_sums",
    "ratio_and_se",
    "DomainLoss",
    "domain_loss",
]


@dataclass
class EvalSample:
    """Blocks to score: input_ids [B, S], target domain [B, S-1] (-1 = not scored), names."""

    input_ids: torch.Tensor
    target_domain: torch.Tensor  # int64 [B, S-1]: domain of token t+1, -1 where not scored
    domains: list[str]
    split: str  # which split of which folder (named in every result)

    @property
    def num_tokens(self) -> int:
        """Scored target tokens."""
        return int((self.target_domain >= 0).sum())

    @property
    def num_sequences(self) -> int:
        """B."""
        return int(self.input_ids.shape[0])


def sample_from_blocks(blocks: PackedBlocks, split: str) -> EvalSample:
    """EvalSample from packed blocks (targets at document starts are dropped)."""
    dom = blocks.domain[:, 1:].to(torch.int64)
    dom = dom.masked_fill(blocks.pos[:, 1:] == 0, -1)
    return EvalSample(blocks.input_ids, dom, list(blocks.domains), split)


def load_sample(
    data_dir: str | os.PathLike[str],
    split: str = "test",
    sample_tokens: int | None = 16384,
    seq_len: int = 128,
    vocab_size: int | None = None,
    model_tokenizer: str | os.PathLike[str] | None = None,
) -> EvalSample:
    """Evenly spaced `seq_len` blocks of `split` of a prepared data folder, about `sample_tokens`
    tokens in all (None = the whole split); checks the ids fit the model's vocabulary and, when
    given, that the model was saved with the same tokenizer."""
    from moelab.data.dataset import TokenStream

    root = Path(data_dir)
    if not (root / "data.json").is_file():
        raise DataError(
            f"--corpus {root}: not a prepared data folder (no data.json); pass the data/ folder "
            "that `moelab train` wrote (e.g. runs/demo/train/data)"
        )
    path = root / "tokens" / f"{split}.npz"
    if not path.is_file():
        have = sorted(p.stem for p in (root / "tokens").glob("*.npz"))
        raise DataError(f"--split {split}: {path} does not exist; the folder has {have}")
    if model_tokenizer is not None and Path(model_tokenizer).is_file():
        mine, theirs = Path(model_tokenizer).read_bytes(), (root / "tokenizer.json").read_bytes()
        if mine != theirs:
            raise DataError(
                f"{model_tokenizer} differs from {root / 'tokenizer.json'}: the model was not "
                "trained with this data folder's tokenizer, its token ids would mean other text"
            )
    if sample_tokens is not None and sample_tokens < seq_len:
        raise InputError(f"--sample {sample_tokens}: must be >= seq_len={seq_len} tokens")
    stream = TokenStream.load(path)
    max_blocks = None if sample_tokens is None else max(1, sample_tokens // seq_len)
    blocks = pack_blocks(stream, seq_len, max_blocks=max_blocks)
    if vocab_size is not None and int(blocks.input_ids.max()) >= vocab_size:
        raise DataError(
            f"{path}: token id {int(blocks.input_ids.max())} >= the model's vocab_size "
            f"{vocab_size}: the data was tokenised for another model"
        )
    return sample_from_blocks(blocks, f"{split} split of {root}")


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of a moelab MoETransformer or a transformers causal LM."""
    if hasattr(model, "blocks") and hasattr(model, "cfg"):
        return model(input_ids).logits
    return model(input_ids=input_ids, use_cache=False).logits


def _is_moelab(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "cfg")


def _moelab_blocks(
    model: nn.Module, ids: torch.Tensor, h: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """Run blocks[start:stop] of a moelab model on hidden states h (no padding, no cache), the
    same operations as MoETransformer.forward."""
    from moelab.models.transformer import rotary_cos_sin

    S = ids.shape[1]
    pos = torch.arange(S, device=ids.device)
    cos, sin = rotary_cos_sin(pos, model.cfg.head_dim, model.cfg.rope_theta, h.dtype)
    mask, is_causal = model._attention_mask(None, S, S, h.device)
    for block in model.blocks[start:stop]:
        h, _ = block(h, cos, sin, mask, is_causal, ids, None, None)
    return h


@torch.no_grad()
def block_inputs(
    model: nn.Module,
    sample: EvalSample,
    block: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Hidden states entering transformer block `block` for each batch of the sample (moelab
    models): an ablation at that block leaves everything before it unchanged, so it reuses them."""
    if not _is_moelab(model):
        raise InputError("block_inputs: only moelab MoETransformers can be run from a block")
    out = []
    for i in range(0, sample.num_sequences, batch_size):
        ids = sample.input_ids[i : i + batch_size].to(device)
        out.append(_moelab_blocks(model, ids, model.embed_tokens(ids), 0, block))
    return out


@torch.no_grad()
def sequence_sums(
    model: nn.Module,
    sample: EvalSample,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    start_block: int = 0,
    states: list[torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(loss sums [B, D], token counts [B, D]) of next-token cross-entropy per sequence and domain.

    With `states` (from `block_inputs(model, sample, start_block, batch_size)`) a moelab model
    runs from block `start_block` on; the result is the same as the full forward pass.
    """
    D = len(sample.domains)
    B = sample.num_sequences
    sums = np.zeros((B, D), dtype=np.float64)
    counts = np.zeros((B, D), dtype=np.float64)
    for n_batch, i in enumerate(range(0, B, batch_size)):
        ids = sample.input_ids[i : i + batch_size].to(device)
        dom = sample.target_domain[i : i + batch_size].to(device)
        if states is not None:
            h = _moelab_blocks(model, ids, states[n_batch], start_block, len(model.blocks))
            logits = model.lm_head(model.norm(h))[:, :-1].float()
        else:
            logits = forward_logits(model, ids)[:, :-1].float()
        s, c = logit_sums(logits, ids, dom, D)
        sums[i : i + ids.shape[0]] = s.cpu().numpy()
        counts[i : i + ids.shape[0]] = c.cpu().numpy()
    return sums, counts


def logit_sums(
    logits: torch.Tensor, ids: torch.Tensor, dom: torch.Tensor, num_domains: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss sums [B, D], counts [B, D]) in float64 from float logits [B, S-1, V] of
    input_ids [B, S], with the target domain [B, S-1] (-1 = not scored)."""
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    valid = dom >= 0
    idx = dom.clamp_min(0)
    s = torch.zeros(ids.shape[0], num_domains, dtype=torch.float64, device=logits.device)
    c = torch.zeros_like(s)
    s.scatter_add_(1, idx, (nll * valid).double())
    c.scatter_add_(1, idx, valid.double())
    return s, c


def ratio_and_se(s: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """sum(s)/sum(n) over sequences and its cluster-robust standard error (NaN if < 2 sequences)."""
    total = float(n.sum())
    if total <= 0:
        return float("nan"), float("nan")
    r = float(s.sum()) / total
    m = int((n > 0).sum())
    if m < 2:
        return r, float("nan")
    resid = s - r * n
    return r, float(np.sqrt(m / (m - 1) * float((resid**2).sum())) / total)


@dataclass
class DomainLoss:
    """Mean token loss (or loss change) per domain and over all tokens, with standard errors."""

    domains: list[str]
    value: dict[str, float]  # domain or "all" -> mean
    se: dict[str, float]
    tokens: dict[str, int]


def domain_loss(sums: np.ndarray, counts: np.ndarray, domains: list[str]) -> DomainLoss:
    """Per-domain and overall ratio estimates from per-sequence sums (see the module docstring)."""
    if sums.shape != counts.shape or sums.shape[1] != len(domains):
        raise InputError(
            f"domain_loss: sums {sums.shape} and counts {counts.shape} must both be "
            f"[sequences, {len(domains)} domains]"
        )
    value, se, tokens = {}, {}, {}
    for j, d in enumerate(domains):
        value[d], se[d] = ratio_and_se(sums[:, j], counts[:, j])
        tokens[d] = int(counts[:, j].sum())
    value["all"], se["all"] = ratio_and_se(sums.sum(1), counts.sum(1))
    tokens["all"] = int(counts.sum())
    return DomainLoss(list(domains), value, se, tokens)


def load_corpus_sample(
    corpus: str,
    tokenizer: object,
    split: str = "test",
    sample_tokens: int | None = 16384,
    seq_len: int = 128,
    max_bytes: int | None = 3_000_000,
    seed: int = 0,
    vocab_size: int | None = None,
) -> EvalSample:
    """EvalSample from a corpus (built-in name or path) split by document as `moelab train` does
    (`split_documents`, fractions 0.8/0.1/0.1, `seed`), tokenised with the model's tokenizer."""
    from moelab.data.corpora import corpus_domains, load_corpus
    from moelab.data.dataset import TokenStream
    from moelab.data.splits import SPLITS, split_documents
    from moelab.trace.api import make_encoder

    if split not in SPLITS:
        raise DataError(f"--split {split!r}: expected one of {SPLITS}")
    docs = load_corpus(corpus, max_bytes=max_bytes, seed=seed)
    domains = corpus_domains(docs)
    part = split_documents(docs, seed=seed)[split]
    if not part:
        raise DataError(f"corpus {corpus}: the {split} split is empty")
    encode, bos, _ = make_encoder(tokenizer)
    code = {d: i for i, d in enumerate(domains)}
    ids, doc, pos, dom = [], [], [], []
    for j, d in enumerate(part):
        t = ([bos] if bos is not None else []) + list(encode(d.text))
        ids.append(np.asarray(t, dtype=np.int32))
        doc.append(np.full(len(t), j, dtype=np.int32))
        pos.append(np.arange(len(t), dtype=np.int32))
        dom.append(np.full(len(t), code[d.domain], dtype=np.int16))
    stream = TokenStream(
        np.concatenate(ids), np.concatenate(doc), np.concatenate(pos), np.concatenate(dom),
        [d.doc_id for d in part], domains,
    )  # fmt: skip
    if sample_tokens is not None and sample_tokens < seq_len:
        raise InputError(f"--sample {sample_tokens}: must be >= seq_len={seq_len} tokens")
    max_blocks = None if sample_tokens is None else max(1, sample_tokens // seq_len)
    blocks = pack_blocks(stream, seq_len, max_blocks=max_blocks)
    if vocab_size is not None and int(blocks.input_ids.max()) >= vocab_size:
        raise DataError(f"token id {int(blocks.input_ids.max())} >= vocab_size {vocab_size}")
    return sample_from_blocks(
        blocks, f"{split} split (document hash, seed {seed}) of corpus {corpus}"
    )
