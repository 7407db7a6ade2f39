"""CLI: `moelab predict fit | eval | compare` (expert predictors on TraceStore directories).

A trace directory written by `moelab trace` is read with TraceStore; gates.safetensors (if
present) feeds gate lookahead. Without a separate --test trace, a held-out share of whole
documents is carved from the train trace (seeded) and never shown to `fit`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def _parse_opts(opts: list[str] | None) -> dict[str, Any]:
    """'key=value' strings -> dict with ints, floats, bools parsed."""
    from moelab.errors import ConfigError

    out: dict[str, Any] = {}
    for o in opts or []:
        if "=" not in o:
            raise ConfigError(f"--opt {o!r}: expected key=value")
        k, v = o.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def document_keys(store: Any) -> set[tuple[str, str]]:
    """(corpus, document name) of every document a store traced (doc ids when unnamed)."""
    corpus = str(store.meta.corpus or "")
    tab = store.documents()
    if tab is not None and "name" in tab.column_names:
        return {(corpus, str(n)) for n in tab.column("name").to_pylist()}
    ids = store.load().doc_id
    return {(corpus, f"{store.meta.split}:{int(i)}") for i in set(ids.tolist())}


def shared_documents(train_store: Any, test_store: Any) -> float:
    """Share of the test trace's documents that the train trace also holds (0 = held-out)."""
    te = document_keys(test_store)
    return len(te & document_keys(train_store)) / len(te) if te else 0.0


def test_trace_label(test: Path, split: str | None, shared: float) -> str:
    """How a --test trace is named in tables: its path, the split it traced, and held-out
    only when no document of it is also in the train trace."""
    held = (
        "held-out"
        if shared == 0
        else "in-sample: same documents as --train"
        if shared == 1
        else f"NOT held-out: {shared:.0%} of its documents are also in --train"
    )
    return f"--test trace {test} (traced split {split or '?'!r}; {held})"


def load_splits(
    train: Path, test: Path | None, holdout: float, seed: int
) -> tuple[Any, Any, str, Any]:
    """(train Trace, test Trace, description of the test split, GateSet or None).

    A --test trace of another model than --train (router fingerprints differ) is refused.
    """
    from moelab.errors import ConfigError
    from moelab.predict.base import split_by_document
    from moelab.trace.schema import check_same_model
    from moelab.trace.store import TraceStore

    store = TraceStore.open(train)
    if test is not None:
        test_store = TraceStore.open(test)
        a, b = store.meta, test_store.meta
        check_same_model(
            a.model_fingerprint,
            a.model,
            f"--train trace {train}",
            b.model_fingerprint,
            b.model,
            f"--test trace {test}",
        )
    full = store.load()
    gates = store.gates() if (Path(train) / "gates.safetensors").exists() else None
    if test is not None:
        te = test_store.load()
        shared = shared_documents(store, test_store)
        return full, te, test_trace_label(test, te.meta.split, shared), gates
    if not 0 < holdout < 1:
        raise ConfigError(
            f"--holdout={holdout}: expected a fraction in (0, 1) when --test is not given"
        )
    parts = split_by_document(full, {"train": 1 - holdout, "test": holdout}, seed=seed)
    desc = f"test = {holdout:.0%} of the documents of {train} (seed {seed}), held out from fit"
    return parts["train"], parts["test"], desc, gates


def register(app: typer.Typer) -> None:
    """Add the `predict` command group to the moelab app."""
    sub = typer.Typer(
        help="Expert predictors: fit, evaluate on held-out data, compare.", no_args_is_help=True
    )
    app.add_typer(sub, name="predict")

    @sub.command("fit")
    def fit(
        train: Path = typer.Option(..., "--train", help="trace directory to fit on"),
        predictor: str = typer.Option(
            "ngram2", "--predictor", help="registry name (see `predict list`)"
        ),
        horizon: str = typer.Option(
            "d=1", "--horizon", help="'d=<layers ahead>' or 't+<tokens ahead>'"
        ),
        out: Path = typer.Option(..., "--out", help="directory to save the fitted predictor"),
        holdout: float = typer.Option(0.2, help="share of documents held out (not fitted on)"),
        opt: list[str] = typer.Option(
            None, "--opt", help="predictor option key=value (repeatable)"
        ),
        seed: int = typer.Option(0, help="seed for the split and training"),
        stream: bool = typer.Option(
            False,
            help="never load the whole trace: count-based predictors stream over the shards,"
            " others fit on a seeded sample of --sample-tokens train tokens",
        ),
        sample_tokens: int = typer.Option(200_000, help="train tokens sampled with --stream"),
    ) -> None:
        """Fit one predictor on the train part of a trace and save it (safetensors + JSON)."""
        from rich.console import Console

        from moelab.predict import Horizon, make_predictor

        if stream:
            from moelab.predict.streaming import fit_store
            from moelab.trace.store import TraceStore

            store = TraceStore.open(train)
            gates = store.gates() if (Path(train) / "gates.safetensors").exists() else None
            p = make_predictor(
                predictor, Horizon.parse(horizon), gates=gates, seed=seed, **_parse_opts(opt)
            )
            fit_store(p, store, holdout, seed, sample_tokens=sample_tokens)
            desc = (
                f"test = {holdout:.0%} of the documents of {train} (seed {seed}), held out from fit"
            )
            p.fit_info.update({"trace": str(train), "test_split": desc})
            p.save(out)
            how = (
                "streamed over the shards"
                if p.fit_info["streamed"]
                else f"a seeded sample of {p.fit_info['sample_tokens']} tokens"
            )
            Console().print(
                f"fitted {p.label} on {p.fit_info['train_tokens']} train rows ({how}) -> {out}"
            )
            return
        tr, _, desc, gates = load_splits(train, None, holdout, seed)
        p = make_predictor(
            predictor, Horizon.parse(horizon), gates=gates, seed=seed, **_parse_opts(opt)
        )
        p.fit(tr)
        p.fit_info.update(
            {"trace": str(train), "holdout": holdout, "split_seed": seed, "test_split": desc}
        )
        p.save(out)
        c = p.cost(tr.select(slice_rows(tr.num_tokens)))
        Console().print(
            f"fitted {p.label} on {tr.num_tokens} train rows -> {out}\n"
            f"params {c.params}, {c.bytes} bytes, {c.us_per_token:.2f} µs/token, step {c.us_per_step:.0f} µs"
        )

    @sub.command("eval")
    def eval_(
        model: Path = typer.Option(..., "--model", help="saved predictor directory"),
        test: Path = typer.Option(None, "--test", help="test trace directory"),
        trace: Path = typer.Option(
            None, "--trace", help="trace the predictor was fitted on (carve holdout)"
        ),
        out: Path = typer.Option(None, "--out", help="write the result JSON here"),
    ) -> None:
        """Score a saved predictor on held-out data (a --test trace, or the holdout it was fitted beside)."""
        from rich.console import Console

        from moelab._io import atomic_write_json
        from moelab.errors import ConfigError
        from moelab.predict import Predictor, TokenBuckets, evaluate
        from moelab.trace.store import TraceStore

        p = Predictor.load(model)
        src = trace or (Path(p.fit_info["trace"]) if "trace" in p.fit_info else None)
        if test is None and src is None:
            raise ConfigError(
                "predict eval: give --test TRACE_DIR (or --trace, the trace it was fitted on)"
            )
        if test is not None:  # the fit trace is not needed (and may have moved)
            st = TraceStore.open(test)
            p.check_model(st.meta, f"--test trace {test}", str(model))
            te = st.load()
            desc, buckets = f"{te.meta.split or 'test'} ({test})", None
        else:
            tr, te, desc, _ = load_splits(
                src,
                None,
                float(p.fit_info.get("holdout", 0.2)),
                int(p.fit_info.get("split_seed", 0)),
            )
            p.check_model(te, f"--trace {src}", str(model))
            buckets = TokenBuckets.from_trace(tr)
        res = evaluate(p, te, split_name=desc, buckets=buckets)
        res["seed"] = int(p.fit_info.get("split_seed", 0))
        if out is not None:
            atomic_write_json(out, res)
        o = res["overall"]
        Console().print(
            f"{p.label} on {desc}: rows {int(o['rows'])}, recall@k {o['recall@k']:.3f}, exact {o['exact_set']:.3f},"
            f" top1-in-set {o['top1_in_true']:.3f}"
        )

    @sub.command("compare")
    def compare_(
        train: Path = typer.Option(..., "--train", help="trace directory to fit on"),
        test: Path = typer.Option(
            None, "--test", help="test trace directory (default: hold out documents)"
        ),
        holdout: float = typer.Option(
            0.2, help="share of documents held out when --test is not given"
        ),
        horizons: str = typer.Option("d=1,d=2,d=3,t+1", help="comma-separated horizons"),
        predictors: str = typer.Option(
            "default", help="comma-separated registry names or 'default'"
        ),
        out: Path = typer.Option(Path("predict_compare"), "--out", help="output directory"),
        epochs: int = typer.Option(30, help="max epochs of the neural predictors"),
        seed: int = typer.Option(0, help="seed for the split and training"),
    ) -> None:
        """Fit every predictor per horizon on train, score on held-out docs, print table + CSV + plots."""
        from moelab._io import atomic_write_text
        from moelab.predict import PREDICTORS, Horizon, compare, default_suite, make_predictor
        from moelab.predict.neural import NeuralPredictor

        tr, te, desc, gates = load_splits(train, test, holdout, seed)
        fitted = []
        points = tuple(tr.hidden) if tr.hidden else ()
        for h in [Horizon.parse(x) for x in horizons.split(",") if x.strip()]:
            if h.layers_ahead >= tr.meta.num_layers:
                typer.echo(
                    f"skipping horizon {h}: the trace has only {tr.meta.num_layers} MoE layers"
                )
                continue
            names = (
                default_suite(
                    h, has_hidden=bool(tr.hidden), has_gates=gates is not None, points=points
                )
                if predictors == "default"
                else [x.strip() for x in predictors.split(",") if x.strip()]
            )
            for name in names:
                cls = PREDICTORS[name][0] if name in PREDICTORS else None
                if cls is not None and h.kind not in cls.horizon_kinds:
                    continue
                kw = (
                    {"epochs": epochs}
                    if cls is not None and issubclass(cls, NeuralPredictor)
                    else {}
                )
                fitted.append(make_predictor(name, h, gates=gates, seed=seed, **kw).fit(tr))
        res = compare(
            fitted,
            te,
            train=tr,
            split_name=desc,
            out_dir=out,
            test_in_sample=test is not None and "held-out)" not in desc,
            seed=seed,
        )
        atomic_write_text(out / "README.txt", f"train: {train}\ntest: {desc}\nseed: {seed}\n")
        typer.echo(f"wrote {', '.join(res.files.values())}")

    @sub.command("list")
    def list_() -> None:
        """List predictor names and the horizons they support."""
        from moelab.predict import PREDICTORS

        for name, (cls, kw) in PREDICTORS.items():
            typer.echo(
                f"{name:26s} {cls.__name__:16s} {'/'.join(cls.horizon_kinds):28s} {kw or ''}"
            )


def slice_rows(n: int, limit: int = 2048) -> Any:
    """Row indices of the first min(n, limit) rows (cost measurement sample)."""
    import numpy as np

    return np.arange(min(n, limit))
