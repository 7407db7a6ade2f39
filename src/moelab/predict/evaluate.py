"""Honest evaluation of expert predictors: per layer, overall, per token-frequency bucket.

`evaluate(predictor, test)` scores one fitted predictor on a trace (recording the split name
and whether the numbers are in-sample); `compare(predictors, test, train=...)` scores several
on the same rows (the intersection of what each can see, per horizon and layer), adds the
in-sample numbers on the train split side by side when asked, prints a rich table, writes CSV,
JSON and per-layer PNG plots. Metrics are those of `moelab.predict.metrics`. The token-id
table baseline of Jiang et al. 2024 ("Mixtral of Experts", Sec. 5) was built and scored on the
same data; here held-out and in-sample numbers are labelled and reported separately.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from moelab.errors import PredictorError, TraceError
from moelab.predict import metrics as M
from moelab.predict.base import Horizon, Predictor
from moelab.trace.schema import Trace, check_same_model

TOP_TOKENS = 100
RARE_MAX = 5


@dataclass
class TokenBuckets:
    """Token-frequency buckets from the train split: top-N ids, rare ids (<= rare_max), rest."""

    top_ids: np.ndarray
    counts: dict[int, int] = field(default_factory=dict)
    rare_max: int = RARE_MAX

    @classmethod
    def from_trace(
        cls, train: Trace, top: int = TOP_TOKENS, rare_max: int = RARE_MAX
    ) -> TokenBuckets:
        """Count token ids of the train split."""
        ids, cnt = np.unique(train.token_id, return_counts=True)
        order = np.lexsort((ids, -cnt))
        return cls(
            top_ids=ids[order[:top]],
            counts=dict(zip(ids.tolist(), cnt.tolist(), strict=True)),
            rare_max=rare_max,
        )

    def assign(self, token_id: np.ndarray) -> dict[str, np.ndarray]:
        """Bucket name -> [N] bool mask for the given token ids."""
        top = np.isin(token_id, self.top_ids)
        c = np.array([self.counts.get(int(t), 0) for t in token_id.tolist()], np.int64)
        rare = (c <= self.rare_max) & ~top
        return {
            f"top{self.top_ids.size}": top,
            f"rare(<={self.rare_max})": rare,
            "other": ~top & ~rare,
        }


NOT_HELD_OUT = ("in-sample", "NOT held-out")


def held_out(split_name: str, in_sample: bool) -> bool:
    """True only when the scored rows are documents the predictor was not fitted on."""
    return not in_sample and not any(w in split_name for w in NOT_HELD_OUT)


def scored_on_label(split_name: str, in_sample: bool) -> str:
    """The split as named by the caller, with held-out/in-sample added unless it says so."""
    if any(w in split_name for w in ("held-out", "held out", *NOT_HELD_OUT)):
        return split_name
    return f"{split_name} ({'in-sample' if in_sample else 'held-out'})"


def domain_masks(trace: Trace) -> dict[str, np.ndarray]:
    """Row mask per domain name of the trace (empty when it has a single domain)."""
    names = list(trace.meta.domains or [])
    if len(names) < 2:
        return {}
    dom = np.asarray(trace.domain)
    return {str(n): dom == i for i, n in enumerate(names)}


BASELINES = {"prior": "any", "prev-layer": "d", "prev-token": "t"}


def baseline_verdicts(results: Sequence[dict[str, Any]]) -> list[str]:
    """Per result: "yes", "no (loses to X)" or "baseline"/"" against the baselines (prior;
    prev-layer for d>=1; prev-token for t+1) scored on the same split and horizon."""
    out = []
    for r in results:
        if r["predictor"] in BASELINES:
            out.append("baseline")
            continue
        hz = str(r["horizon"])
        mine = r["overall"].get("recall@k", float("nan"))
        lost, seen = [], 0
        for b in results:
            kind = BASELINES.get(b["predictor"])
            if kind is None or b["horizon"] != hz or b["scored_on"] != r["scored_on"]:
                continue
            if kind != "any" and not hz.startswith(kind):
                continue
            seen += 1
            if not mine > b["overall"].get("recall@k", float("nan")):
                lost.append(b["predictor"])
        out.append("" if not seen else f"NO (loses to {', '.join(lost)})" if lost else "yes")
    return out


def evaluate(
    predictor: Predictor,
    test: Trace,
    split_name: str = "test",
    *,
    in_sample: bool = False,
    buckets: TokenBuckets | None = None,
    budgets: Sequence[int] | None = None,
    rows: dict[int, np.ndarray] | None = None,
    layers: Sequence[int] | None = None,
    measure_cost: bool = True,
) -> dict[str, Any]:
    """Score one fitted predictor on `test`; returns a JSON-able dict recording the split.

    rows: optional per-layer [N] bool masks restricting the scored rows (used by compare).
    Rows without a source (NaN scores) or without any true expert are always excluded.
    """
    if not predictor.fitted:
        raise PredictorError(f"evaluate: {predictor.label} is not fitted")
    k, e = test.meta.top_k, test.meta.num_experts
    b = list(budgets) if budgets is not None else M.default_budgets(k, e)
    bmask = buckets.assign(test.token_id) if buckets is not None else {}
    dmask = domain_masks(test)
    per_layer: dict[int, dict[str, float]] = {}
    total: dict[str, float] = {}
    bucket_tot: dict[str, dict[str, float]] = {name: {} for name in bmask}
    domain_tot: dict[str, dict[str, float]] = {name: {} for name in dmask}
    for layer in layers if layers is not None else predictor.target_layers():
        s = predictor.predict_scores(test, layer)
        keep = ~np.isnan(s).any(1)
        if rows is not None:
            keep &= rows[layer]
        h = M.row_hits(s[keep], test.expert_ids[keep, layer])
        sums = M.metric_sums(h, b)
        per_layer[layer] = M.finalize(sums)
        total = M.add_sums(total, sums)
        for name, bm in bmask.items():
            sel = bm[keep]
            sub = M.RowHits(h.set_size[sel], h.true_ranks[sel], h.k, h.num_experts)
            bucket_tot[name] = M.add_sums(bucket_tot[name], M.metric_sums(sub, b))
        for name, dm in dmask.items():
            sel = dm[keep]
            sub = M.RowHits(h.set_size[sel], h.true_ranks[sel], h.k, h.num_experts)
            domain_tot[name] = M.add_sums(domain_tot[name], M.metric_sums(sub, b))
    out: dict[str, Any] = {
        "predictor": predictor.describe(),
        "class": type(predictor).__name__,
        "horizon": str(predictor.horizon),
        "split": split_name,
        "in_sample": bool(in_sample),
        "scored_on": scored_on_label(split_name, in_sample),
        "trace_split": str(test.meta.split or ""),
        "held_out": held_out(split_name, in_sample),
        "chance_recall@k": k / e,
        "budgets": b,
        "per_layer": {str(k_): v for k_, v in per_layer.items()},
        "overall": M.finalize(total) if total else {},
        "buckets": {name: M.finalize(v) for name, v in bucket_tot.items()},
        "domains": {name: M.finalize(v) for name, v in domain_tot.items() if v},
        "fit_info": {k_: v for k_, v in predictor.fit_info.items() if k_ != "val_loss"},
    }
    if hasattr(predictor, "size"):
        out["size"] = predictor.size()
    if measure_cost:
        out["cost"] = predictor.cost().to_dict()
    return out


def common_rows(predictors: Sequence[Predictor], trace: Trace) -> dict[str, dict[int, np.ndarray]]:
    """Per horizon and target layer, the rows every predictor of that horizon can score."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for p in predictors:
        hz = out.setdefault(str(p.horizon), {})
        for layer in p.target_layers():
            a = p.available(trace, layer)
            hz[layer] = a if layer not in hz else hz[layer] & a
    return out


@dataclass
class CompareResult:
    """Everything `compare` produced: one dict per (predictor, split) plus written files."""

    results: list[dict[str, Any]]
    files: dict[str, str] = field(default_factory=dict)

    def table_rows(self) -> list[dict[str, Any]]:
        """Flat rows (one per result) for CSV and display."""
        rows: list[dict[str, Any]] = []
        verdicts = baseline_verdicts(self.results)
        for r in self.results:
            o, c = r["overall"], r.get("cost", {})
            row = {
                "predictor": r["predictor"],
                "horizon": r["horizon"],
                "scored_on": r["scored_on"],
                "rows": int(o.get("rows", 0)),
            }
            for key in ("recall@k", "precision@k", "exact_set", "top1_in_true"):
                row[key] = o.get(key, float("nan"))
            for key in sorted((x for x in o if x.startswith("hits=")), key=lambda s: int(s[5:])):
                row[key] = o[key]
            for m in r["budgets"]:
                row[f"recall@{m}"] = o.get(f"recall@{m}", float("nan"))
            for name, bm in r["buckets"].items():
                row[f"recall@k[{name}]"] = bm.get("recall@k", float("nan"))
            for name, dm in r.get("domains", {}).items():
                row[f"recall@k[domain={name}]"] = dm.get("recall@k", float("nan"))
            row["chance_recall@k"] = r.get("chance_recall@k", float("nan"))
            row["beats_baselines"] = verdicts[len(rows)]
            row["trace_split"] = r.get("trace_split", "")
            row["in_sample"] = bool(r.get("in_sample"))
            row["held_out"] = r.get("held_out", not r.get("in_sample"))
            row["seed"] = r.get("seed", "")
            row["contexts"] = r.get("size", {}).get("contexts", "")
            row["params"] = c.get("params", 0)
            row["bytes"] = c.get("bytes", 0)
            row["us_per_token"] = c.get("us_per_token", float("nan"))
            rows.append(row)
        return rows

    def csv_text(self) -> str:
        """The comparison table as CSV text."""
        rows = self.table_rows()
        cols: list[str] = []
        for r in rows:
            cols += [c for c in r if c not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: (f"{v:.4f}" if isinstance(v, float) else v) for c, v in r.items()})
        return buf.getvalue()

    def print(self, console: Any = None) -> None:
        """Print the comparison as a rich table."""
        from rich.console import Console
        from rich.table import Table

        if console is None:
            console = Console()
            if not console.is_terminal:  # files/pipes: do not squeeze the table into 80 columns
                console = Console(width=200)
        rows = self.table_rows()
        if not rows:
            console.print("no results")
            return
        keys = ["recall@k", "exact_set", "top1_in_true"]
        keys += [c for c in rows[0] if c.startswith("hits=")]
        extra = [
            c
            for c in rows[0]
            if c.startswith("recall@") and c not in keys and "[" not in c and c != "recall@k"
        ]
        bucket = [c for c in rows[0] if c.startswith("recall@k[") and "domain=" not in c]
        t = Table(
            title="Expert predictors (recall@k = share of true experts in the predicted top-k; CSV has all columns)",
            caption=self.caption(),
        )
        heads = ["predictor", "horizon", "scored on", "rows", "recall@k", "exact", "top1∈S"]
        heads += [c for c in keys if c.startswith("hits=")] + extra
        heads += [c[len("recall@k[") : -1] for c in bucket]
        heads += ["beats baselines", "params", "µs/tok"]
        for col in heads:
            t.add_column(
                col,
                justify="left"
                if col in ("predictor", "horizon", "scored on", "beats baselines")
                else "right",
            )
        for r in rows:
            t.add_row(
                r["predictor"],
                r["horizon"],
                short_split(r),
                str(r["rows"]),
                *[f"{r.get(c, float('nan')):.3f}" for c in keys + extra + bucket],
                r["beats_baselines"],
                str(r["params"]) if r["params"] else "",
                "" if r["us_per_token"] != r["us_per_token"] else f"{r['us_per_token']:.2f}",
            )
        console.print(t)
        doms = sorted({c for r in rows for c in r if c.startswith("recall@k[domain=")})
        if doms:
            d = Table(title="recall@k per domain", caption=self.caption())
            for col in ["predictor", "horizon", "scored on"] + [c[16:-1] for c in doms]:
                d.add_column(
                    col, justify="left" if col in ("predictor", "horizon", "scored on") else "right"
                )
            for r in rows:
                d.add_row(
                    r["predictor"],
                    r["horizon"],
                    short_split(r),
                    *[f"{r.get(c, float('nan')):.3f}" for c in doms],
                )
            console.print(d)

    def caption(self) -> str:
        """Chance level, scored split(s) and seed, for the tables."""
        parts = []
        chance = sorted({r.get("chance_recall@k") for r in self.results} - {None})
        if chance:
            parts.append("chance recall@k (k/E) = " + ", ".join(f"{c:.3f}" for c in chance))
        parts += sorted({f"scored on: {r['scored_on']}" for r in self.results})
        seeds = sorted({str(r["seed"]) for r in self.results if "seed" in r})
        if seeds:
            parts.append("seed " + ", ".join(seeds))
        return "; ".join(parts)

    def plot(self, out_dir: str | Path) -> dict[str, str]:
        """One PNG per horizon: held-out recall@k per target layer for each predictor."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        files = {}
        for hz in sorted({r["horizon"] for r in self.results}):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for r in self.results:
                if r["horizon"] != hz or r["in_sample"]:
                    continue
                layers = sorted(int(x) for x in r["per_layer"])
                vals = [r["per_layer"][str(x)]["recall@k"] for x in layers]
                ax.plot(layers, vals, marker="o", label=r["predictor"])
            ax.set_xlabel("target MoE layer")
            ax.set_ylabel("recall@k (held-out)")
            ax.set_title(f"Expert prediction, horizon {hz}")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            plt.close(fig)
            name = "per_layer_" + hz.replace("=", "").replace("+", "") + ".png"
            path = Path(out_dir) / name
            atomic_write_bytes(path, buf.getvalue())
            files[hz] = str(path)
        return files


def short_split(r: dict[str, Any]) -> str:
    """'<traced split> (held-out|in-sample|NOT held-out)' for a table cell."""
    split = r.get("trace_split") or "?"
    if r.get("in_sample") and "--test trace" not in r["scored_on"]:
        return f"{split} (in-sample, fit rows)"
    if "NOT held-out" in r["scored_on"]:
        return f"{split} (NOT held-out)"
    if "in-sample" in r["scored_on"]:
        return f"{split} (in-sample)"
    return f"{split} (held-out)"


def compare(
    predictors: Sequence[Predictor],
    test: Trace,
    *,
    train: Trace | None = None,
    split_name: str = "test",
    in_sample: bool = True,
    same_rows: bool = True,
    budgets: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    show: bool = True,
    test_in_sample: bool = False,
    seed: int | None = None,
) -> CompareResult:
    """Score fitted predictors on `test` (and, if `in_sample` and `train` given, on train).

    With `same_rows`, predictors sharing a horizon are scored on the same rows per layer.
    Writes compare.csv, compare.json and per-layer PNGs into `out_dir` when given.
    """
    if not predictors:
        raise PredictorError("compare: no predictors given")
    if train is not None:
        try:
            check_same_model(
                train.meta.model_fingerprint,
                train.meta.model,
                "the train trace",
                test.meta.model_fingerprint,
                test.meta.model,
                "the test trace",
            )
        except TraceError as exc:
            raise PredictorError(str(exc)) from None
    buckets = TokenBuckets.from_trace(train) if train is not None else None
    results = []
    splits = [(test, split_name, test_in_sample)]
    if in_sample and train is not None:
        splits.append((train, train.meta.split or "train", True))
    for tr, name, ins in splits:
        rows = common_rows(predictors, tr) if same_rows else {}
        for p in predictors:
            results.append(
                evaluate(
                    p,
                    tr,
                    name,
                    in_sample=ins,
                    buckets=buckets,
                    budgets=budgets,
                    rows=rows.get(str(p.horizon)),
                    measure_cost=tr is test,
                )
            )
    if seed is not None:
        for r in results:
            r["seed"] = int(seed)
    res = CompareResult(results)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "compare.csv", res.csv_text())
        atomic_write_json(out / "compare.json", results)
        res.files = {"csv": str(out / "compare.csv"), "json": str(out / "compare.json")}
        res.files.update({f"plot {k}": v for k, v in res.plot(out).items()})
    if show:
        res.print()
    return res


def report_section(results: CompareResult | list[dict[str, Any]], report: Any = None) -> Any:
    """Add (or build) a `moelab.report.Section` with the comparison table and per-layer plots."""
    import tempfile

    from moelab.report import Section

    res = results if isinstance(results, CompareResult) else CompareResult(list(results))
    caption = (
        "Expert predictors scored on held-out documents ('held-out' rows); in-sample rows are"
        " scored on the split they were fitted on and labelled so. recall@k = share of the true"
        " experts inside the predicted top-k; recall@m for m > k are prefetch budgets; cost is"
        " measured on this machine."
    )
    title = "Expert predictors"
    sec = report.section(title, caption) if report is not None else Section(title, caption)
    sec.table(
        res.table_rows(), caption="held-out and in-sample results, overall over target layers"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for hz, path in res.plot(tmp).items():
            sec.png(
                Path(path).read_bytes(), caption=f"held-out recall@k per target layer, horizon {hz}"
            )
    return sec


__all__ = [
    "Horizon",
    "TokenBuckets",
    "evaluate",
    "compare",
    "CompareResult",
    "report_section",
    "common_rows",
]
