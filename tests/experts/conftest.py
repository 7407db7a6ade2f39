"""Shared tiny models and a tiny prepared corpus for the experts tests (one torch thread)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from moelab.layers.config import MoEConfig
from moelab.models import MoETransformer, MoETransformerConfig

torch.set_num_threads(1)

WORDS = (
    "the a cat dog house river runs sleeps quickly green old small man woman sees takes "
    "and or but in on under with big red tree walks eats slowly happy"
).split()


def tiny_moe(
    vocab: int = 97,
    seed: int = 0,
    num_experts: int = 6,
    top_k: int = 2,
    n_layers: int = 2,
    **moe_kw,
) -> MoETransformer:
    """A random-init causal MoE LM (d_model 32) with non-trivial weights."""
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=num_experts, top_k=top_k, **moe_kw)
    cfg = MoETransformerConfig(
        vocab_size=vocab, d_model=32, n_layers=n_layers, n_heads=4, d_ff=top_k * 16,
        max_seq_len=64, moe=moe, init_std=0.1, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    return MoETransformer(cfg, seed=seed).eval()


def _sentences(rng, n: int) -> str:
    out = []
    for _ in range(n):
        k = int(rng.integers(4, 10))
        out.append(
            " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), k)).capitalize() + "."
        )
    return " ".join(out)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A prepared data folder of two domains (english-toy prose, code-ish lines)."""
    import numpy as np

    from moelab.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    rng = np.random.default_rng(0)
    for i in range(14):
        (src / "english-toy").mkdir(parents=True, exist_ok=True)
        (src / "english-toy" / f"d{i}.txt").write_text(_sentences(rng, 40))
        (src / "code").mkdir(parents=True, exist_ok=True)
        lines = [
            f"def f{j}(x):\n    return x * {j} + {int(rng.integers(0, 9))}\n" for j in range(30)
        ]
        (src / "code" / f"c{i}.py").write_text("".join(lines))
    prepare_data(str(src), root / "data", vocab_size=300, seed=0)
    return root / "data"


@pytest.fixture(scope="session")
def model_dir(prepared, tmp_path_factory) -> Path:
    """A tiny moelab MoE saved with the prepared folder's tokenizer."""
    from moelab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared / "tokenizer.json")
    m = tiny_moe(vocab=tok.get_vocab_size(), seed=3)
    d = tmp_path_factory.mktemp("model") / "moe"
    m.save(d)
    shutil.copyfile(prepared / "tokenizer.json", d / "tokenizer.json")
    return d
