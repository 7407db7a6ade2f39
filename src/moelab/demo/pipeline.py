"""The whole moelab chain on the built-in default corpus, one cached stage at a time:

data + tokenizer -> train MoE and the dense model of equal active FLOPs -> trace the train and
held-out test splits (router ids, weights, logits, hidden states) -> analyses -> fit predictors on
the train trace, score them on the test trace -> offload replay sweep + live offloaded generation
-> one self-contained report.html + summary.json.

Each stage writes under `runs/demo/<stage>/` and a `done.json`; an interrupted run resumes
(training continues from its last checkpoint) and a second run reuses what is done.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from moelab._io import atomic_write_json
from moelab.errors import ConfigError
from moelab.stages import StageRunner

console = Console()


@dataclass
class DemoConfig:
    """Sizes of every stage; `quick()` is the <= 3 minute variant used by the end-to-end test.

    Budgets are work (steps, tokens), so the numbers do not depend on how busy the machine is;
    `time_cap_minutes` is only a safety limit per trained model, and a run it stops is flagged
    in summary.json, the headline and the report."""

    out: str = "runs/demo"
    quick: bool = False
    seed: int = 0
    corpus: str = "default"
    max_bytes: int | None = 3_000_000
    max_steps: int = 500  # optimizer steps per model (MoE and dense): the training budget
    # 16 experts of hidden 64, top-2 (dense twin: FFN hidden 128): many small experts, where
    # MoE pays at this budget (bench/RESULTS.md, "Demo model"); None = TrainConfig's default
    num_experts: int | None = 16
    expert_d_ff: int | None = 64
    # aux-loss-free balancing (Wang et al. 2024) on top of the aux loss: without it the busiest
    # expert took 3.8x its uniform share and experts died (bench/RESULTS.md, demo model section)
    bias_update_rate: float = 1e-3
    time_cap_minutes: float | None = 30.0  # wall-clock safety cap per model (None = none)
    trace_train_tokens: int = 120_000
    trace_test_tokens: int = 60_000
    hidden_rate: float = 1.0
    trace_doc_chars: int = 6000  # characters traced per document (spreads the cap over documents)
    predictor_epochs: int = 8  # was 12: fewer keep make demo within 15 min (bench/RESULTS.md)
    horizons: tuple[int, ...] = (1, 2, 3)
    offload_tokens: int = 4000  # test-trace rows replayed per offload simulation
    generate_tokens: int = 48
    speed_repeats: int = 5  # interleaved all-resident / offloaded repeats of live generation
    threads: int = 0
    # train MoE and dense at once, one thread each (moelab.train.compare, parallel=True): sooner
    # on a 2-core machine, and the numbers do not depend on the core count
    parallel_train: bool = True

    @classmethod
    def make(cls, quick: bool = False, **overrides: Any) -> DemoConfig:
        """Default or quick config with overrides (None values ignored)."""
        base: dict[str, Any] = {}
        if quick:
            base = dict(
                quick=True,
                max_bytes=400_000,
                max_steps=60,
                num_experts=None,  # the --quick model's own (4 experts)
                expert_d_ff=None,
                trace_train_tokens=30_000,
                trace_test_tokens=8_000,
                trace_doc_chars=1500,
                predictor_epochs=4,
                horizons=(1,),
                offload_tokens=600,
                generate_tokens=12,
                speed_repeats=3,
            )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


# ------------------------------------------------------------------------------ stages
def stage_train(cfg: DemoConfig, d: Path) -> dict[str, Any]:
    """Train the MoE LM and its equal-active-FLOPs dense twin on the same data (moelab compare)."""
    from moelab.train.compare import compare
    from moelab.train.config import load_train_config

    tcfg = load_train_config(
        None,
        quick=cfg.quick,
        corpus=cfg.corpus,
        max_bytes=cfg.max_bytes,
        max_minutes=cfg.time_cap_minutes,
        max_steps=cfg.max_steps,
        bias_update_rate=cfg.bias_update_rate,
        num_experts=cfg.num_experts,
        d_ff=cfg.expert_d_ff,
        eval_every=None if cfg.quick else 100,
        seed=cfg.seed,
        out_dir=str(d),
        data_dir=str(d / "data"),
        threads=cfg.threads,
    )
    res = compare(tcfg, d, console=console, resume=True, parallel=cfg.parallel_train)
    moe, dense = res["runs"]["moe"], res["runs"]["dense"]
    data_info = json.loads((d / "data" / "data.json").read_text())
    return {
        "warnings": res["warnings"],
        "max_steps": tcfg.max_steps,
        "moe_steps": moe["steps"],
        "dense_steps": dense["steps"],
        "split_tokens": data_info["tokens"],
        "split_documents": data_info["documents"],
        "moe_dir": str(d / "moe" / "model"),
        "dense_dir": str(d / "dense" / "model"),
        "data_dir": str(d / "data"),
        "unigram_ppl": res["unigram_ppl"],
        "moe_val_ppl": moe["final_val_ppl"],
        "dense_val_ppl": dense["final_val_ppl"],
        "moe_ppl_at_equal_flops": moe["val_ppl_at_equal_flops"],
        "dense_ppl_at_equal_flops": dense["val_ppl_at_equal_flops"],
        "moe_tokens_per_s": moe["tokens_per_s"],
        "dense_tokens_per_s": dense["tokens_per_s"],
        "moe_total_params": moe["total_params"],
        "moe_active_params": moe["active_params"],
        "dense_total_params": dense["total_params"],
        "compare_png": str(d / "compare.png"),
        "train_config": tcfg.model_dump(),
    }


def split_docs(cfg: DemoConfig, data_dir: str) -> dict[str, list]:
    """The exact train/validation/test documents the model was trained with (from splits.json)."""
    from moelab.data.corpora import load_corpus
    from moelab.data.splits import apply_splits, load_splits

    docs = load_corpus(cfg.corpus, max_bytes=cfg.max_bytes, seed=cfg.seed)
    return apply_splits(docs, load_splits(Path(data_dir) / "splits.json"))


def interleave_domains(docs: list, max_chars: int) -> list:
    """Round-robin over domains in corpus order (so a token cap covers every domain), each
    document cut to max_chars characters (so a few long documents cannot fill the whole cap)."""
    from dataclasses import replace

    from moelab.data.sampling import interleave_by_domain

    return [replace(d, text=d.text[:max_chars]) for d in interleave_by_domain(docs, shuffle=False)]


def trace_splits(
    model: Any,
    tok: Any,
    docs: dict[str, list],
    d: Path,
    max_tokens: dict[str, int],
    doc_chars: int,
    corpus: str,
    seed: int,
    command: str,
    hidden_rate: float = 1.0,
) -> dict[str, Any]:
    """Trace each split named in `max_tokens` (domains interleaved, documents cut to doc_chars)
    with router logits and router-input + residual hidden states, into d/<split>."""
    from moelab.trace.api import trace_model

    out: dict[str, Any] = {}
    for split, n in max_tokens.items():
        store = trace_model(
            model,
            interleave_domains(docs[split], doc_chars),
            tok,
            d / split,
            split=split,
            logits=True,
            hidden_rate=hidden_rate,
            hidden_points=("router_input", "residual"),
            max_tokens=n,
            corpus=corpus,
            seed=seed,
            command=command,
        )
        out[f"{split}_trace"] = str(d / split)
        out[f"{split}_tokens"] = int(store.num_tokens)
    return out


def stage_trace(cfg: DemoConfig, d: Path, train: dict[str, Any]) -> dict[str, Any]:
    """Trace the train split (for fitting predictors) and the test split (for everything else)."""
    from moelab.data.tokenizer import load_tokenizer
    from moelab.models.transformer import MoETransformer

    return trace_splits(
        MoETransformer.load(train["moe_dir"]),
        load_tokenizer(Path(train["data_dir"]) / "tokenizer.json"),
        split_docs(cfg, train["data_dir"]),
        d,
        {"train": cfg.trace_train_tokens, "test": cfg.trace_test_tokens},
        cfg.trace_doc_chars,
        cfg.corpus,
        cfg.seed,
        "moelab demo",
        cfg.hidden_rate,
    )


def stage_analyze(cfg: DemoConfig, d: Path, train: dict, traces: dict) -> dict[str, Any]:
    """All routing analyses on the held-out test trace."""
    from moelab.analysis.run import analyze
    from moelab.data.tokenizer import load_tokenizer
    from moelab.trace.store import TraceStore

    test = TraceStore.open(traces["test_trace"]).load()
    tok = load_tokenizer(Path(train["data_dir"]) / "tokenizer.json")
    numbers = analyze(test, d, tokenizer=tok, seed=cfg.seed, max_points=1000 if cfg.quick else 2000)
    return {
        "numbers": str(d / "numbers.json"),
        "report": str(d / "report.html"),
        **headline_analysis(numbers),
    }


def headline_analysis(numbers: dict[str, Any]) -> dict[str, Any]:
    """Balance and consecutive-token repeat vs chance, averaged over layers (test split)."""
    out: dict[str, Any] = {}
    bal = numbers.get("balance", [])
    if bal:
        out["balance_norm_entropy"] = float(np.mean([r["norm_entropy"] for r in bal]))
        out["balance_max_over_mean"] = float(np.max([r["max_over_mean"] for r in bal]))
        out["dead_experts"] = int(np.sum([r["dead"] for r in bal]))
    rep = numbers.get("repeat")
    if rep:
        out["repeat_same_top1"] = float(np.mean([r["same_top1"] for r in rep["per_layer"]]))
        out["repeat_any_overlap"] = float(np.mean([r["any_overlap"] for r in rep["per_layer"]]))
        out["repeat_chance_top1"] = float(rep["chance_top1"])
        out["repeat_chance_any"] = float(rep["chance_any"])
    return out


def predictor_names(cfg: DemoConfig, horizon, has_hidden: bool) -> list[str]:
    """The predictor suite for one horizon (smaller in quick mode)."""
    from moelab.predict import default_suite

    names = default_suite(horizon, has_hidden=has_hidden, has_gates=True, points=("residual",))
    if cfg.quick:
        keep = {
            "prior",
            "prev-layer",
            "prev-token",
            "markov",
            "ngram2",
            "gate-lookahead",
            "probe-linear",
            "token-mlp",
        }
        names = [n for n in names if n in keep]
    return names


def stage_predict(cfg: DemoConfig, d: Path, traces: dict) -> dict[str, Any]:
    """Fit every predictor on the train trace; score on the held-out test trace, per horizon."""
    from moelab.predict import Horizon, make_predictor
    from moelab.predict.evaluate import compare
    from moelab.trace.store import TraceStore

    tr_store = TraceStore.open(traces["train_trace"])
    train, test = tr_store.load(), TraceStore.open(traces["test_trace"]).load()
    gates = tr_store.gates()
    L = train.meta.num_layers
    horizons = [Horizon(layers_ahead=h) for h in cfg.horizons if h < L] + [Horizon(tokens_ahead=1)]
    results: dict[str, Any] = {"split": "test", "fit_split": "train", "horizons": {}}
    all_rows = []
    for hz in horizons:
        preds = []
        for name in predictor_names(cfg, hz, bool(train.hidden)):
            opts = {"epochs": cfg.predictor_epochs} if name in NEURAL else {}
            p = make_predictor(name, hz, gates=gates, seed=cfg.seed, **opts)
            p.fit(train)
            p.name = name
            preds.append(p)
            if name in ("gate-lookahead", "ngram2", "markov") or name == "probe-mlp":
                p.save(d / "predictors" / f"{hz}-{name}")
        res = compare(preds, test, train=train, split_name="test", out_dir=d / str(hz), show=True)
        all_rows.extend(res.results)
        held = [r for r in res.results if not r.get("in_sample")]
        best = max(held, key=lambda r: r["overall"]["recall@k"])
        gate = next((r for r in held if r["predictor"] == "gate-lookahead"), None)
        results["horizons"][str(hz)] = {
            "best": best["predictor"],
            "best_recall_at_k": best["overall"]["recall@k"],
            "gate_lookahead_recall_at_k": gate["overall"]["recall@k"] if gate else None,
            "prior_recall_at_k": next(
                r["overall"]["recall@k"] for r in held if r["predictor"] == "prior"
            ),
        }
    atomic_write_json(d / "all_results.json", all_rows)
    return results


NEURAL = {
    "token-mlp",
    "token-mlp-sets",
    "probe-linear",
    "probe-mlp",
    "probe-shared",
    "probe-residual",
    "temporal-mlp",
}


def stage_offload(
    cfg: DemoConfig, d: Path, train: dict, traces: dict, pred: dict
) -> dict[str, Any]:
    """Replay sweep (policies x cache sizes, with and without predictor prefetch) and a short
    live offloaded generation checked token-for-token against the all-resident model."""
    from moelab.data.tokenizer import load_tokenizer
    from moelab.models.transformer import MoETransformer
    from moelab.offload.live import generate_offloaded
    from moelab.offload.simulate import get_hardware, oracle_plan, plan_from_predictor, simulate
    from moelab.predict.base import Predictor
    from moelab.trace.store import TraceStore

    test = TraceStore.open(traces["test_trace"]).load()
    n = min(cfg.offload_tokens, test.num_tokens)
    sub = test.select(np.arange(n))
    model = MoETransformer.load(train["moe_dir"])
    expert_bytes = model.blocks[model.moe_layer_indices()[0]].ffn.experts.expert_nbytes()
    hw = get_hardware("nvme-ram", expert_bytes=expert_bytes)
    L, E, k = sub.meta.num_layers, sub.meta.num_experts, sub.meta.top_k
    pdir = d.parent / "predict" / "predictors"
    plans: dict[str, Any] = {"none": None}
    for name in ("gate-lookahead", "probe-mlp"):  # gate lookahead and the usual best predictor
        if (pdir / f"d=1-{name}").exists():
            plans[name] = plan_from_predictor(Predictor.load(pdir / f"d=1-{name}"), sub)
    plans["oracle"] = oracle_plan(sub.expert_ids, 1)
    # per-layer caches of k, k+1, ... experts, and one global cache of 10% of all experts
    sizes = sorted({k, max(k, round(E / 4)), max(k, E // 2)})  # k, 25% and 50% of a layer
    caches = [(f"{c} of {E} per layer", c, True) for c in sizes]
    caches.append((f"10% of all {L * E} (global)", max(k, int(round(0.1 * L * E))), False))
    rows = []
    for label_c, cap, per_layer in caches:
        for policy in ("lru", "lfu", "lfru", "belady"):
            for label, plan in plans.items():
                r = simulate(
                    sub.expert_ids, E, cap, policy, hardware=hw, plan=plan,
                    expert_bytes=expert_bytes, per_layer=per_layer,
                )  # fmt: skip
                row = {"cache": label_c, "policy": policy, "prefetch": label}
                row.update(
                    {kk: v for kk, v in r.to_dict().items() if isinstance(v, (int, float, str))}
                )
                rows.append(row)
    atomic_write_json(
        d / "replay.json",
        {
            "split": "test",
            "rows": rows,
            "tokens": n,
            "hardware": asdict(hw) if hasattr(hw, "__dataclass_fields__") else str(hw),
        },
    )
    tok = load_tokenizer(Path(train["data_dir"]) / "tokenizer.json")
    docs = split_docs(cfg, train["data_dir"])["test"]
    prompt = torch.tensor([tok.encode(docs[0].text[:400]).ids[:24]])
    resident = max(k, int(round(0.25 * E)))  # 25% of experts, but never fewer than k per layer
    live = generate_offloaded(
        lambda: MoETransformer.load(train["moe_dir"]),
        prompt,
        cfg.generate_tokens,
        resident=resident,
        policy="lru",
        prefetch="adaptive",
        store_dir=d / "store",
        compare=True,
        repeats=cfg.speed_repeats,
    )
    atomic_write_json(d / "live.json", live)
    dec = live["decode"]
    # the replay row of the same cache (resident experts per layer, LRU), deterministic
    same = [
        r for r in rows
        if r["cache"] == f"{resident} of {E} per layer" and r["policy"] == "lru"
    ]  # fmt: skip
    flat = {
        "resident": f"{resident} of {E} experts per layer",
        "policy": "lru",
        "prefetch": "adaptive",
        "decode_tokens_per_s": dec["tokens_per_s"],
        "prefill_tokens_per_s": live["prefill"]["tokens_per_s"],
        "stall_ms_per_token": dec["stall_ms_per_token"],
        "bytes_per_token": dec["bytes_per_token"],
        "timely_hit_rate": dec["timely_hit_rate"],
        "speed_ratio": live.get("speed_vs_all_resident"),
        "speed_ratio_repeats": live.get("speed_vs_all_resident_repeats"),
        "identical_to_all_resident": live.get("identical_to_all_resident"),
        "store_tier": live["store"].get("tier") if isinstance(live.get("store"), dict) else None,
    }
    return {
        "replay": str(d / "replay.json"),
        "replay_same_cache": {r["prefetch"]: r["hit_rate"] for r in same},
        "live": flat,
    }


# ------------------------------------------------------------------------------ report
def write_report(cfg: DemoConfig, root: Path, res: dict[str, Any]) -> dict[str, Any]:
    """One self-contained report.html with every stage, plus summary.json (headline numbers)."""
    from moelab.demo.report import build_report

    summary = headline({**res, "config": asdict(cfg)})
    rep = build_report(cfg, res, summary)
    rep.write(root / "report.html")
    atomic_write_json(
        root / "summary.json", {"config": asdict(cfg), "headline": summary, "stages": res}
    )
    return summary


# Mixtral 8x7B, consecutive tokens with the same top-1 expert (chance 12.5%), layers 0 / 15 / 31
PUBLISHED_MIXTRAL_SAME_TOP1 = {
    "low": 0.14,
    "high": 0.28,
    "source": "Mixtral paper routing analysis",
}


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers. Everything outside `timings` is a function of the seed and the work
    budgets; `timings` holds wall-clock measurements (ratios from interleaved repeats)."""
    from moelab.provenance import provenance
    from moelab.timing import RatioSummary

    tr, pr, off = res["train"], res["predict"], res["offload"]
    an = headline_analysis(json.loads(Path(res["analyze"]["numbers"]).read_text()))
    h1 = pr["horizons"].get("d=1") or next(iter(pr["horizons"].values()))
    live = off["live"]
    speed = RatioSummary(tuple(live["speed_ratio_repeats"]), cannot_exceed_one=True)
    return {
        "run": {
            "corpus": res["config"]["corpus"],
            "max_bytes": res["config"]["max_bytes"],
            "seed": res["config"]["seed"],
            "split_documents": tr["split_documents"],
            "split_tokens": tr["split_tokens"],
            "max_steps": tr["max_steps"],
            **provenance(),
        },
        "warnings": list(tr["warnings"]),
        "perplexity": {
            "moe_at_equal_flops": tr["moe_ppl_at_equal_flops"],
            "dense_at_equal_flops": tr["dense_ppl_at_equal_flops"],
            "moe": tr["moe_val_ppl"],
            "dense": tr["dense_val_ppl"],
            "unigram": tr["unigram_ppl"],
            "moe_steps": tr["moe_steps"],
            "dense_steps": tr["dense_steps"],
            "split": "validation",
        },
        "balance": {
            "normalized_entropy_mean": an.get("balance_norm_entropy"),
            "max_over_mean_worst_layer": an.get("balance_max_over_mean"),
            "dead_experts": an.get("dead_experts"),
            "split": "test",
        },
        "repeat_rate": {
            "same_top1": an.get("repeat_same_top1"),
            "chance_top1": an.get("repeat_chance_top1"),
            "any_overlap": an.get("repeat_any_overlap"),
            "published_mixtral_same_top1": PUBLISHED_MIXTRAL_SAME_TOP1,
            "split": "test",
        },
        "predictor": {
            "best": h1["best"],
            "best_recall_at_k": h1["best_recall_at_k"],
            "gate_lookahead_recall_at_k": h1["gate_lookahead_recall_at_k"],
            "split": "test",
        },
        "offload": {
            "resident": live.get("resident"),
            "replay_hit_rate_lru": off["replay_same_cache"].get("none"),
            "replay_hit_rate_lru_gate_prefetch": off["replay_same_cache"].get("gate-lookahead"),
            "identical_to_all_resident": live.get("identical_to_all_resident"),
            "split": "test",
        },
        "timings": {
            "offload_speed_vs_all_resident": speed.to_dict(),
            "offload_live_timely_hit_rate": live.get("timely_hit_rate"),
            "moe_train_tokens_per_s": tr["moe_tokens_per_s"],
            "dense_train_tokens_per_s": tr["dense_tokens_per_s"],
        },
    }


def print_headline(h: dict[str, Any], report: Path) -> None:
    """Rich table of the headline numbers (warnings first, in red)."""

    def f(x: Any, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt) if isinstance(x, (int, float)) else str(x)

    for w in h["warnings"]:
        console.print(f"[bold red]WARNING[/bold red] {w}")
    t = Table(title="moelab demo: headline numbers")
    t.add_column("what")
    t.add_column("value")
    p = h["perplexity"]
    t.add_row(
        "validation perplexity MoE vs dense of equal active FLOPs/token, equal training FLOPs",
        f"{f(p['moe_at_equal_flops'], '.1f')} vs {f(p['dense_at_equal_flops'], '.1f')} "
        f"({p['moe_steps']} / {p['dense_steps']} steps; unigram {f(p['unigram'], '.1f')})",
    )
    b = h["balance"]
    t.add_row(
        "balance (test): normalised entropy (1 = uniform) / worst max-over-mean / dead experts",
        f"{f(b['normalized_entropy_mean'])} / {f(b['max_over_mean_worst_layer'], '.2f')} / "
        f"{f(b['dead_experts'], 'd')}",
    )
    r = h["repeat_rate"]
    pub = r["published_mixtral_same_top1"]
    t.add_row(
        "consecutive tokens, same top-1 expert (test) vs chance; Mixtral published",
        f"{f(r['same_top1'])} vs {f(r['chance_top1'])}; Mixtral {pub['low']:.2f}-{pub['high']:.2f}",
    )
    q = h["predictor"]
    t.add_row(
        f"best predictor recall@k, 1 layer ahead, held-out ({q['best']})",
        f"{f(q['best_recall_at_k'])} vs gate lookahead {f(q['gate_lookahead_recall_at_k'])}",
    )
    o, tm = h["offload"], h["timings"]
    t.add_row(
        f"offload replay ({o['resident']}, LRU): hit rate without / with gate prefetch (test)",
        f"{f(o['replay_hit_rate_lru'])} / {f(o['replay_hit_rate_lru_gate_prefetch'])}",
    )
    t.add_row(
        "live offloaded generation (LRU + adaptive prefetch) speed vs all-resident",
        f"{tm['offload_speed_vs_all_resident']['text']}; identical output: "
        f"{o['identical_to_all_resident']}",
    )
    console.print(t)
    console.print(f"[bold]report:[/bold] {report}")


def run_demo(cfg: DemoConfig | None = None, force: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the headline numbers."""
    cfg = cfg or DemoConfig()
    if cfg.trace_test_tokens < 100:
        raise ConfigError(f"trace_test_tokens={cfg.trace_test_tokens}: need at least 100 tokens")
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(root, force=force)
    p = asdict(cfg)
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    res["train"] = runner.run(
        "train",
        _keys(
            p,
            "quick seed corpus max_bytes max_steps num_experts expert_d_ff bias_update_rate "
            "time_cap_minutes",
        ),
        lambda d: stage_train(cfg, d),
        resumable=True,
    )
    res["trace"] = runner.run(
        "trace",
        _keys(
            p,
            "quick seed corpus max_bytes trace_train_tokens trace_test_tokens hidden_rate trace_doc_chars",
        ),
        lambda d: stage_trace(cfg, d, res["train"]),
        resumable=True,
    )
    res["analyze"] = runner.run(
        "analyze",
        {**_keys(p, "seed"), "trace": res["trace"]},
        lambda d: stage_analyze(cfg, d, res["train"], res["trace"]),
    )
    res["predict"] = runner.run(
        "predict",
        {**_keys(p, "seed predictor_epochs horizons quick"), "trace": res["trace"]},
        lambda d: stage_predict(cfg, d, res["trace"]),
    )
    res["offload"] = runner.run(
        "offload",
        {
            **_keys(p, "seed offload_tokens generate_tokens speed_repeats"),
            "trace": res["trace"],
            "v": 3,
        },
        lambda d: stage_offload(cfg, d, res["train"], res["trace"], res["predict"]),
    )
    summary = write_report(cfg, root, res)
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    print_headline(summary, root / "report.html")
    return summary


def _keys(d: dict[str, Any], names: str) -> dict[str, Any]:
    return {k: d[k] for k in names.split()}


def load_summary(out: str | Path = "runs/demo") -> dict[str, Any]:
    """Read summary.json of a finished demo."""
    return json.loads((Path(out) / "summary.json").read_text())


if __name__ == "__main__":  # pragma: no cover
    run_demo(DemoConfig.make(quick="--quick" in sys.argv))
