"""Shared tiny models and a tiny prepared corpus for the experts tests (one torch thread)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from experts_tiny import sentences, tiny_moe

torch.set_num_threads(1)


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
        (src / "english-toy" / f"d{i}.txt").write_text(sentences(rng, 40))
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
