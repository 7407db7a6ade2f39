"""The demo's report.html: a summary of the five headline numbers on top, then one section per
pipeline stage in order, each figure captioned with its chance baseline, each number with the
command that reproduces it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelab.report import Report


def _fmt(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt) if isinstance(x, (int, float)) else str(x)


def build_report(cfg: Any, res: dict[str, Any], h: dict[str, Any]) -> Report:
    """Assemble the demo report from the stages' outputs."""
    root = Path(cfg.out)
    q = " --quick" if cfg.quick else ""
    rep = Report(
        "moelab demo",
        "A small MoE language model trained here on the built-in corpora, its routing traced on "
        "held-out documents, analysed against chance, predicted by several predictors fitted on "
        "the training split only, and run with most experts offloaded. Every number names its "
        f"split. Reproduce everything with `moelab demo{q}` (cached under {root}).",
    )
    for w in h["warnings"]:
        rep.add_warning(w)
    run = h["run"]
    rep.add_fact("corpus", f"{run['corpus']} (first {run['max_bytes']:,} bytes)")
    rep.add_fact(
        "splits (by document)",
        ", ".join(
            f"{s}: {run['split_documents'][s]:,} documents, {run['split_tokens'][s]:,} tokens"
            for s in run["split_tokens"]
        ),
    )
    rep.add_fact("seed", run["seed"])
    rep.add_fact("training budget", f"{run['max_steps']:,} steps per model")
    rep.add_fact("moelab", f"{run['moelab_version']} (commit {run['moelab_commit'] or 'unknown'})")
    rep.add_fact(
        "environment",
        f"torch {run['torch']}, transformers {run['transformers']}, numpy {run['numpy']}, "
        f"Python {run['python']}",
    )
    p, b, r, pr, o = h["perplexity"], h["balance"], h["repeat_rate"], h["predictor"], h["offload"]
    pub, speed = r["published_mixtral_same_top1"], h["timings"]["offload_speed_vs_all_resident"]
    trace = res["trace"]["test_trace"]
    rep.add_summary(
        [
            {
                "what": "validation perplexity, MoE vs dense of equal active FLOPs, at equal training FLOPs",
                "value": f"{_fmt(p.get('moe_at_equal_flops'), '.1f')} vs "
                f"{_fmt(p.get('dense_at_equal_flops'), '.1f')} after {p['moe_steps']} / "
                f"{p['dense_steps']} steps (unigram {_fmt(p['unigram'], '.1f')})",
                "reproduce": f"moelab compare{q}",
            },
            {
                "what": "expert balance (test): normalised entropy (1 = uniform), worst max/mean load, dead experts",
                "value": f"{_fmt(b['normalized_entropy_mean'])}, "
                f"{_fmt(b['max_over_mean_worst_layer'], '.2f')}, {_fmt(b['dead_experts'], 'd')}",
                "reproduce": f"moelab analyze {trace} --out OUT",
            },
            {
                "what": "consecutive tokens with the same top-1 expert (test split) vs chance and "
                "the published Mixtral 8x7B range",
                "value": f"{_fmt(r['same_top1'])} vs chance {_fmt(r['chance_top1'])}; Mixtral "
                f"{pub['low']:.2f}-{pub['high']:.2f}",
                "reproduce": f"moelab analyze {trace} --out OUT",
            },
            {
                "what": f"best predictor recall@k one layer ahead, held-out test ({pr['best']})",
                "value": f"{_fmt(pr['best_recall_at_k'])} vs gate lookahead {_fmt(pr['gate_lookahead_recall_at_k'])}",
                "reproduce": f"moelab predict compare --train {res['trace']['train_trace']} --test {trace}",
            },
            {
                "what": f"offload replay, {o['resident']} resident, LRU: hit rate without / with "
                "gate-lookahead prefetch (test)",
                "value": f"{_fmt(o['replay_hit_rate_lru'])} / "
                f"{_fmt(o['replay_hit_rate_lru_gate_prefetch'])}",
                "reproduce": f"moelab offload simulate --trace {trace}",
            },
            {
                "what": f"live offloaded generation, {o['resident']} resident, LRU + adaptive "
                "prefetch: speed vs all-resident (median, min-max of interleaved repeats)",
                "value": f"{speed['text']}; identical output {o['identical_to_all_resident']}",
                "reproduce": f"moelab generate --model {res['train']['moe_dir']} --tokenizer "
                f"{res['train']['data_dir']}/tokenizer.json --prompt TEXT --resident 25% --policy lru "
                "--prefetch adaptive",
            },
        ]
    )
    _training_section(rep, res["train"], q)
    _analysis_sections(rep, Path(res["analyze"]["numbers"]).parent)
    _predictor_section(rep, root / "predict")
    _offload_section(rep, root / "offload", res["offload"])
    return rep


def _training_section(rep: Report, tr: dict[str, Any], q: str) -> None:
    sec = rep.section(
        "1. Training: MoE vs dense at equal active compute",
        "Both models see the same tokens of the training split; validation perplexity is measured "
        "on held-out documents. The dense model has the same FLOPs per token as the MoE's active "
        "experts. Chance level is the unigram perplexity (a model that ignores context).",
    )
    png = Path(tr["compare_png"])
    if png.exists():
        sec.png(
            png.read_bytes(),
            caption="validation perplexity vs training FLOPs and wall time "
            f"(reproduce: moelab compare{q})",
        )
    sec.table(
        [
            {
                "model": "MoE",
                "params": tr["moe_total_params"],
                "active params": tr["moe_active_params"],
                "val ppl": tr["moe_val_ppl"],
                "ppl at equal FLOPs": tr["moe_ppl_at_equal_flops"],
                "tokens/s": tr["moe_tokens_per_s"],
            },
            {
                "model": "dense",
                "params": tr["dense_total_params"],
                "active params": tr["dense_total_params"],
                "val ppl": tr["dense_val_ppl"],
                "ppl at equal FLOPs": tr["dense_ppl_at_equal_flops"],
                "tokens/s": tr["dense_tokens_per_s"],
            },
            {"model": "unigram baseline", "val ppl": tr["unigram_ppl"]},
        ],
        caption="split: validation",
    )


def _analysis_sections(rep: Report, analyze_dir: Path) -> None:
    """Re-use the analysis stage's own sections (saved as sections.json by `analyze`)."""
    from moelab.report.persist import load_sections

    saved = analyze_dir / "sections.json"
    if not saved.exists():
        rep.section("2. Routing analysis", f"(analysis sections missing: {saved})")
        return
    _, sections = load_sections(saved)
    for i, sec in enumerate(sections):
        sec.title = f"2.{i + 1} {sec.title}"
        rep.sections.append(sec)


def _predictor_section(rep: Report, pdir: Path) -> None:
    from moelab.predict.evaluate import report_section

    rows_path = pdir / "all_results.json"
    if rows_path.exists():
        sec = report_section(json.loads(rows_path.read_text()), rep)
        sec.title = "3. Expert predictors (fitted on train, scored on held-out test)"


def _offload_section(rep: Report, odir: Path, off: dict[str, Any]) -> None:
    sec = rep.section(
        "4. Offloading: expert cache and prefetch",
        "Replay of the held-out test trace token by token against an expert cache holding a share "
        "of each layer's experts, with and without prefetching the experts a predictor names one "
        "layer ahead. 'oracle' prefetch knows the true next-layer experts (upper bound); Belady is "
        "the optimal eviction policy (upper bound). Chance: with no prefetch and LRU, the hit rate "
        "of a uniform router would be about the cached share of experts.",
    )
    replay = json.loads((odir / "replay.json").read_text())
    cols = [
        "cache",
        "policy",
        "prefetch",
        "hit_rate",
        "timely_hit_rate",
        "bytes_per_token",
        "stall_ms_per_token",
        "tokens_per_s",
    ]
    sec.table(
        [{c: row.get(c) for c in cols} for row in replay["rows"]],
        caption=f"replay on {replay['tokens']} test tokens (split: {replay['split']})",
    )
    sec.table(
        [off["live"]], caption="live offloaded generation vs all-resident (exact greedy mode)"
    )
