"""`analyze(trace, out_dir)`: run every routing analysis, write numbers (JSON + CSV), figures
(PNG + interactive plotly HTML) and a self-contained report.html with captions that say what
each figure shows and what chance looks like.

Analyses that cannot run on a trace (no logits, k=1, one document, no tokenizer) are skipped with
the reason recorded in numbers.json["skipped"] and shown in the report.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from moelab._io import atomic_write_json, atomic_write_text
from moelab.analysis import (
    coactivation,
    plots,
    predictability,
    projections,
    repeat,
    saturation,
    specialization,
    trajectories,
    transitions,
    usage,
)
from moelab.analysis._common import check_trace, set_members
from moelab.errors import AnalysisError, ConfigError
from moelab.report import Report
from moelab.trace.schema import Trace


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by None recursively so numbers.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _per_layer(**cols: np.ndarray) -> list[dict[str, Any]]:
    n = len(next(iter(cols.values())))
    return [{"layer": i, **{k: float(v[i]) for k, v in cols.items()}} for i in range(n)]


def _sample_layers(num_l: int, at_most: int = 4) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, num_l - 1, min(at_most, num_l))})


class _Out:
    """Collects numbers and figures; writes PNG/HTML files and fills the report."""

    def __init__(self, out_dir: Path, report: Report | None, figures: bool = True) -> None:
        self.dir = out_dir
        self.figures = figures
        self.fig_dir = out_dir / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.report = report
        self.numbers: dict[str, Any] = {"skipped": {}}
        self.files: list[str] = []

    def png(self, sec: Any, name: str, fig: Any, caption: str) -> None:
        import matplotlib.pyplot as plt

        if not self.figures:
            plt.close(fig)
            return
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        data = buf.getvalue()
        from moelab._io import atomic_write_bytes

        atomic_write_bytes(self.fig_dir / f"{name}.png", data)
        self.files.append(f"figures/{name}.png")
        if sec is not None:
            sec.png(data, caption)

    def plotly(self, sec: Any, name: str, fig: Any, caption: str) -> None:
        if not self.figures:
            return
        js = self.fig_dir / "plotly.min.js"
        if not js.exists():  # one shared copy beside the figure pages (they work offline)
            from plotly.offline import get_plotlyjs

            atomic_write_text(js, get_plotlyjs())
            self.files.append("figures/plotly.min.js")
        atomic_write_text(
            self.fig_dir / f"{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True)
        )
        self.files.append(f"figures/{name}.html")
        if sec is not None:
            sec.plotly(fig, caption)

    def section(self, title: str, caption: str) -> Any:
        return self.report.section(title, caption) if self.report is not None else None

    def csv(self, name: str, rows: list[dict[str, Any]]) -> None:
        _csv(self.dir / f"{name}.csv", rows)
        self.files.append(f"{name}.csv")


MIN_POINTS = 10  # projections need at least this many tokens (5-NN with cross-validation)


def check_analyze_options(n: int = 1, max_points: int = 2000, min_count: int = 10) -> None:
    """ConfigError (naming the CLI flag) for analysis options no trace can satisfy."""
    if n < 1:
        raise ConfigError(
            f"--n {n}: expected a layer distance >= 1 (transitions go from MoE layer l to l+n);"
            " nothing was written"
        )
    if max_points < MIN_POINTS:
        raise ConfigError(
            f"--max-points {max_points}: expected an integer >= {MIN_POINTS} (tokens sampled for"
            " the projections; use --no-projections to skip them); nothing was written"
        )
    if min_count < 1:
        raise ConfigError(
            f"--min-count {min_count}: expected an integer >= 1 (minimum occurrences of a token);"
            " nothing was written"
        )


def analyze(
    trace: Trace,
    out_dir: str | Path,
    tokenizer: Any = None,
    compare: Trace | None = None,
    token_ids: list[int] | None = None,
    context: list[int] | None = None,
    n: int = 1,
    min_count: int = 10,
    text_doc: int | None = None,
    max_points: int = 2000,
    do_projections: bool = True,
    write_report: bool = True,
    figures: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every analysis on `trace`; write numbers.json, CSVs, figures/ and report.html to
    `out_dir`; return the numbers. `compare` = the same text traced at an earlier checkpoint
    (router saturation); `token_ids` = ids for per-token usage; `context` = previous ids for the
    first of `token_ids` (e.g. "I" before "can"); `figures=False` writes numbers and tables only."""
    check_trace(trace, "analyze")
    check_analyze_options(n, max_points, min_count)
    if text_doc is not None and not (trace.doc_id == text_doc).any():
        raise ConfigError(
            f"--doc {text_doc}: document id not in the trace (it holds doc ids"
            f" {int(trace.doc_id.min())}..{int(trace.doc_id.max())}); nothing was written"
        )
    out = Path(out_dir)
    meta = trace.meta
    num_l, num_e, k = meta.num_layers, meta.num_experts, meta.top_k
    decode: Callable[[int], str] | None = (
        specialization.make_decoder(tokenizer) if tokenizer is not None else None
    )
    rep = (
        Report(
            f"moelab routing analysis — {meta.model or 'trace'}",
            f"{trace.num_tokens} tokens, {num_l} MoE layers, top-{k} of {num_e} experts"
            f"{', with router logits' if trace.logits is not None else ', no router logits'}."
            " Every number is per MoE layer and comes with what uniform random routing would give"
            " (chance) and a shuffle baseline (the same statistic after breaking the relation by"
            " permutation), so finite-sample effects are visible.",
        )
        if write_report
        else None
    )
    o = _Out(out, rep, figures)
    o.numbers["meta"] = meta.to_dict()
    o.numbers["n_tokens"] = trace.num_tokens
    summary: list[dict[str, Any]] = []
    layers_x = np.arange(num_l)

    def skip(name: str, exc: Exception) -> None:
        o.numbers["skipped"][name] = str(exc)

    steps: list[tuple[str, Callable[[], None]]] = []

    # 1. usage and balance ---------------------------------------------------------------------
    def do_usage() -> None:
        us = usage.usage(trace, "slots", seed=seed)
        ut = usage.usage(trace, "tokens", seed=seed)
        uw = usage.usage(trace, "slots", weighted=True, seed=seed)
        bal = usage.balance(trace, seed=seed)
        o.numbers["usage"] = {
            "slots": us.share.tolist(),
            "tokens": ut.share.tolist(),
            "weighted": uw.share.tolist(),
            "chance_slots": us.chance,
            "chance_tokens": ut.chance,
        }
        o.csv(
            "usage",
            [
                {
                    "layer": i,
                    "expert": e,
                    "slot_share": us.share[i, e],
                    "token_share": ut.share[i, e],
                    "weighted_share": uw.share[i, e],
                    "slots": us.counts[i, e],
                }
                for i in range(num_l)
                for e in range(num_e)
            ],
        )
        rows = _per_layer(
            norm_entropy=bal.norm_entropy,
            max_over_mean=bal.max_over_mean,
            cv=bal.cv,
            gini=bal.gini,
            dead=bal.dead,
            norm_entropy_uniform_sample=bal.baseline["norm_entropy"],
            cv_uniform_sample=bal.baseline["cv"],
        )
        o.numbers["balance"] = rows
        o.csv("balance", rows)
        summary.append(
            {
                "analysis": "balance: normalised entropy (mean over layers)",
                "value": float(bal.norm_entropy.mean()),
                "chance": 1.0,
                "shuffle baseline": float(bal.baseline["norm_entropy"].mean()),
            }
        )
        summary.append(
            {
                "analysis": "balance: max/mean load (worst layer)",
                "value": float(bal.max_over_mean.max()),
                "chance": 1.0,
                "shuffle baseline": float(bal.baseline["max_over_mean"].max()),
            }
        )
        sec = o.section(
            "Expert usage and load balance",
            "Share of routing slots each expert receives, per MoE layer. Under uniform routing every"
            f" cell would be 1/E = {1 / num_e:.3f} (white); red = used more, blue = used less."
            " Balance metrics: normalised entropy (1 = perfectly even), max/mean (1 = even), CV and"
            " Gini (0 = even), dead experts (share below 0.1/E).",
        )
        o.png(
            sec,
            "usage_slots",
            plots.heatmap(
                us.share,
                "Expert usage (share of slots)",
                "expert",
                "MoE layer",
                center=us.chance,
                cbar_label="share of slots",
            ),
            f"Usage per layer; chance 1/E = {us.chance:.3f}.",
        )
        o.plotly(
            sec,
            "usage_slots",
            plots.usage_plotly(us.share, us.chance, "Expert usage (interactive)"),
            "Hover for exact shares; colour centred on chance.",
        )
        o.png(
            sec,
            "usage_weighted",
            plots.heatmap(
                uw.share,
                "Gate-weighted usage (share of gate mass)",
                "expert",
                "MoE layer",
                center=1 / num_e,
            ),
            "Same, weighting each slot by its gate weight.",
        )
        o.png(
            sec,
            "balance",
            plots.lines(
                layers_x,
                {
                    "normalised entropy": bal.norm_entropy,
                    "Gini": bal.gini,
                    "CV": bal.cv,
                    "entropy, uniform sample": bal.baseline["norm_entropy"],
                },
                "Load balance per layer",
                "MoE layer",
                "value",
                {"even (entropy)": 1.0, "even (CV, Gini)": 0.0},
                dashed=["entropy, uniform sample"],
            ),
            "Dashed: the same metric for uniform random routing of equal size (finite-sample level).",
        )
        if sec is not None:
            sec.table(rows, "Balance per layer.")
        for pos, tid in enumerate(token_ids or []):
            ctx = context if (pos == 0 and context) else None
            try:
                ut1 = usage.usage(
                    trace, "tokens", token_id=int(tid), prev_ids=ctx, min_count=1, seed=seed
                )
            except AnalysisError as exc:
                skip(f"usage for token {tid}", exc)
                continue
            name = f"usage_token_{tid}" + ("_ctx" if ctx else "")
            label = ut1.selection + (f" ({decode(int(tid))!r})" if decode else "")
            o.numbers.setdefault("usage_tokens", {})[label] = {
                "share": ut1.share.tolist(),
                "n": ut1.n_tokens,
            }
            o.png(
                sec,
                name,
                plots.heatmap(
                    ut1.share - ut1.baseline,
                    f"Usage for {label} minus random tokens",
                    "expert",
                    "MoE layer",
                    center=0.0,
                ),
                f"Share of the {ut1.n_tokens} occurrences of {label} routed to each expert, minus the share for"
                " the same number of random tokens (0 = no token preference; chance k/E for both).",
            )

    steps.append(("usage and balance", do_usage))

    def do_entropy() -> None:
        ent = usage.routing_entropy(trace)
        rows = _per_layer(
            mean_norm_entropy=ent.mean_norm_entropy, mean_top1_prob=ent.mean_top1_prob
        )
        o.numbers["routing_entropy"] = rows
        o.csv("routing_entropy", rows)
        summary.append(
            {
                "analysis": "per-token routing entropy / log E (mean)",
                "value": float(ent.mean_norm_entropy.mean()),
                "chance": 1.0,
                "shuffle baseline": float("nan"),
            }
        )
        sec = o.section(
            "Per-token routing entropy",
            "Mean entropy of each token's router distribution, divided by log E. 1 means the router"
            " is undecided (uniform probabilities); low values mean confident routing. Independent of"
            " load balance: a balanced router can still be confident per token.",
        )
        o.png(
            sec,
            "routing_entropy",
            plots.lines(
                layers_x,
                {
                    "mean H(p)/log E": ent.mean_norm_entropy,
                    "mean top-1 probability": ent.mean_top1_prob,
                },
                "Per-token routing entropy",
                "MoE layer",
                "value",
                {"uniform router": 1.0, "1/E": 1 / num_e},
            ),
            "",
        )

    steps.append(("routing entropy", do_entropy))

    # 2. transitions ---------------------------------------------------------------------------
    def do_transitions() -> None:
        ts = transitions.transition_summary(trace, n=n, seed=seed)
        x = np.arange(num_l - n)
        rows = _per_layer(
            nmi_set=ts.nmi_set,
            nmi_set_shuffled=ts.nmi_set_shuffled,
            nmi_top1=ts.nmi_top1,
            nmi_top1_shuffled=ts.nmi_top1_shuffled,
            top1_predictability=ts.top1_predictability,
            top1_majority=ts.top1_chance,
            top1_shuffled=ts.top1_shuffled,
        )
        o.numbers["transitions"] = {"n": n, "per_layer": rows}
        o.csv("transitions", rows)
        summary.append(
            {
                "analysis": f"layer l→l+{n}: NMI of top-{k} sets (mean)",
                "value": float(ts.nmi_set.mean()),
                "chance": 0.0,
                "shuffle baseline": float(ts.nmi_set_shuffled.mean()),
            }
        )
        summary.append(
            {
                "analysis": f"layer l→l+{n}: top-1 predictability (mean)",
                "value": float(ts.top1_predictability.mean()),
                "chance": float(ts.top1_chance.mean()),
                "shuffle baseline": float(ts.top1_shuffled.mean()),
            }
        )
        sec = o.section(
            f"Layer-to-layer transitions (l → l+{n})",
            "How much a token's experts at one layer tell about its experts n layers later."
            " NMI = I/√(H·H) between the layers' top-k sets (0 = independent, 1 = determined);"
            " top-1 predictability = accuracy of guessing the later top-1 expert from the earlier one"
            " (chance = always guessing the most used expert). Matrices count every one of the k×k"
            " expert pairs; lift 1 (white) = independence.",
        )
        o.png(
            sec,
            "transitions_summary",
            plots.lines(
                x,
                {
                    "NMI (sets)": ts.nmi_set,
                    "NMI (top-1)": ts.nmi_top1,
                    "NMI, shuffled": ts.nmi_set_shuffled,
                    "top-1 predictability": ts.top1_predictability,
                    "top-1, majority guess": ts.top1_chance,
                },
                f"Transitions l → l+{n}",
                "from MoE layer l",
                "value",
                {"independent (NMI)": 0.0},
                dashed=["NMI, shuffled", "top-1, majority guess"],
            ),
            "",
        )
        mats = {}
        for layer in _sample_layers(num_l - n, 3):
            tm = transitions.expert_transitions(trace, layer, n, seed=seed)
            mats[layer] = {
                "conditional": tm.conditional.tolist(),
                "lift": tm.lift.tolist(),
                "npmi": tm.npmi.tolist(),
            }
            o.png(
                sec,
                f"transition_lift_L{layer}",
                plots.heatmap(
                    tm.lift,
                    f"Lift, expert at layer {layer} → {layer + n}",
                    f"expert at layer {layer + n}",
                    f"expert at layer {layer}",
                    center=1.0,
                    cbar_label="lift",
                ),
                f"P(a at {layer}, b at {layer + n}) / (P(a) P(b)); 1 = independent. Shuffled rows give lift ≈ 1"
                f" (max |lift−1| after shuffling: {np.abs(tm.baseline_lift - 1).max():.3f}).",
            )
            try:
                st = transitions.set_transitions(trace, layer, n, seed=seed)
            except AnalysisError as exc:
                o.numbers["skipped"][f"set transitions layer {layer}"] = str(exc)
                continue
            labels = [str(set_members(i, num_e, k)) for i in range(st.conditional.shape[0])]
            o.png(
                sec,
                f"set_transition_L{layer}",
                plots.heatmap(
                    st.conditional,
                    f"P(set at {layer + n} | set at {layer})",
                    f"set at layer {layer + n}",
                    f"set at layer {layer}",
                    xticklabels=labels,
                    yticklabels=labels,
                    cbar_label="conditional",
                ),
                f"Order-free top-{k} sets (C({num_e},{k}) = {len(labels)}); rows sum to 1; under independence every"
                " row equals the later layer's set distribution.",
            )
        o.numbers["transitions"]["matrices"] = mats

    steps.append(("transitions", do_transitions))

    # 3. co-activation ------------------------------------------------------------------------
    def do_coact() -> None:
        sec = o.section(
            "Co-activation within a layer",
            f"P(expert b chosen | expert a chosen) over all C(k,2) pairs of a token's top-{k}. Uniform"
            f" random sets give (k−1)/(E−1) = {(k - 1) / max(num_e - 1, 1):.3f} everywhere; structure"
            " means experts that are picked together.",
        )
        res = {}
        for layer in _sample_layers(num_l, 3):
            ca = coactivation.coactivation(trace, layer, seed=seed)
            res[layer] = {
                "conditional": ca.conditional.tolist(),
                "npmi": ca.npmi.tolist(),
                "max_abs_npmi": float(np.abs(ca.npmi[~np.eye(num_e, dtype=bool)]).max()),
            }
            o.png(
                sec,
                f"coactivation_L{layer}",
                plots.heatmap(
                    ca.conditional,
                    f"P(b | a), layer {layer}",
                    "expert b",
                    "expert a",
                    center=ca.chance_conditional,
                ),
                f"White = chance {ca.chance_conditional:.3f}.",
            )
        o.numbers["coactivation"] = res

    steps.append(("co-activation", do_coact))

    # 4. repeat -------------------------------------------------------------------------------
    def do_repeat() -> None:
        rr = repeat.repeat_rate(trace, seed=seed)
        rows = _per_layer(
            same_top1=rr.same_top1,
            any_overlap=rr.any_overlap,
            mean_overlap=rr.mean_overlap,
            load_chance_top1=rr.load_top1,
            load_chance_any=rr.load_any,
            load_chance_mean=rr.load_mean,
            shuffled_top1=rr.shuffled_top1,
            shuffled_any=rr.shuffled_any,
            shuffled_mean=rr.shuffled_mean,
        )
        o.numbers["repeat"] = {
            "per_layer": rows,
            "chance_top1": rr.chance_top1,
            "chance_any": rr.chance_any,
            "chance_mean": rr.chance_mean,
            "n_pairs": rr.n_pairs,
        }
        o.csv("repeat", rows)
        summary.append(
            {
                "analysis": "consecutive tokens: same top-1 (mean)",
                "value": float(rr.same_top1.mean()),
                "chance": rr.chance_top1,
                "shuffle baseline": float(rr.shuffled_top1.mean()),
            }
        )
        summary.append(
            {
                "analysis": f"consecutive tokens: any top-{k} overlap (mean)",
                "value": float(rr.any_overlap.mean()),
                "chance": rr.chance_any,
                "shuffle baseline": float(rr.shuffled_any.mean()),
            }
        )
        sec = o.section(
            "Consecutive-token repeat rate",
            "How often token t uses the same experts as token t−1 in the same layer. Chance for uniform"
            f" routing: same top-1 1/E = {rr.chance_top1:.3f}, any overlap 1 − C(E−k,k)/C(E,k) ="
            f" {rr.chance_any:.3f}, mean overlap k²/E = {rr.chance_mean:.3f}. Dashed: load-weighted chance"
            " (independent draws with the observed loads). Above the dashed line = temporal locality an"
            " expert cache can exploit.",
        )
        o.png(
            sec,
            "repeat",
            plots.lines(
                layers_x,
                {
                    "same top-1": rr.same_top1,
                    "any overlap": rr.any_overlap,
                    "top-1, load-weighted chance": rr.load_top1,
                    "any overlap, load-weighted chance": rr.load_any,
                },
                "Consecutive-token repeat rate",
                "MoE layer",
                "rate",
                {"1/E": rr.chance_top1, "1−C(E−k,k)/C(E,k)": rr.chance_any},
                dashed=["top-1, load-weighted chance", "any overlap, load-weighted chance"],
            ),
            "",
        )

    steps.append(("repeat rate", do_repeat))

    # 5. trajectories -------------------------------------------------------------------------
    def do_traj() -> None:
        tr = trajectories.trajectories(trace, "set", seed=seed)
        rows = [
            {
                "depth": int(tr.depths[d]),
                "distinct": float(tr.distinct[d]),
                "distinct_shuffled": float(tr.distinct_shuffled[d]),
                "distinct_chance": float(tr.distinct_chance[d]),
                "entropy_bits": float(tr.entropy_bits[d]),
                "entropy_shuffled": float(tr.entropy_shuffled[d]),
                "entropy_chance": float(tr.entropy_chance[d]),
            }
            for d in range(tr.depths.size)
        ]
        top = [
            {
                "count": c,
                "path": " → ".join(str(set_members(s, num_e, k)) if s >= 0 else "-" for s in p),
            }
            for p, c in tr.top_paths[:10]
        ]
        o.numbers["trajectories"] = {"per_depth": rows, "top_paths": top, "n_tokens": tr.n_tokens}
        o.csv("trajectories", rows)
        summary.append(
            {
                "analysis": "distinct expert-set paths through all layers",
                "value": float(tr.distinct[-1]),
                "chance": float(tr.distinct_chance[-1]),
                "shuffle baseline": float(tr.distinct_shuffled[-1]),
            }
        )
        sec = o.section(
            "Trajectories through the layers",
            "Each token's path of top-k sets across layers. Fewer distinct paths / lower path entropy than"
            " the shuffled baseline (each layer permuted independently) means choices chain across layers."
            f" Chance (uniform routing) is near min(d·log2 C(E,k), log2 N) = {tr.entropy_chance[-1]:.1f}"
            " bits at full depth.",
        )
        o.png(
            sec,
            "trajectory_entropy",
            plots.lines(
                tr.depths,
                {
                    "path entropy": tr.entropy_bits,
                    "shuffled": tr.entropy_shuffled,
                    "uniform chance": tr.entropy_chance,
                },
                "Path entropy of layer prefixes",
                "layers 0..d−1",
                "bits",
                dashed=["shuffled", "uniform chance"],
            ),
            "",
        )
        if sec is not None:
            sec.table(top, "Most frequent full paths.")
        sl = list(range(min(num_l, 6)))
        if len(sl) >= 2:  # a flow needs two layers; a one-MoE-layer model has none
            flows = trajectories.top1_flow(trace, sl)
            o.plotly(
                sec,
                "sankey",
                plots.sankey(flows, sl, "Top-1 expert flow, first layers"),
                "Width = number of tokens moving from expert a at one layer to expert b at the"
                " next; under independence every node splits in proportion to the next layer's"
                " loads.",
            )
        rows_g, grid = trajectories.token_grid(trace, text_doc, max_tokens=48)
        toks = [decode(int(t)) if decode else str(int(t)) for t in trace.token_id[rows_g]]
        o.png(
            sec,
            "token_grid",
            plots.token_grid(grid, toks, num_e, "Top-1 expert per token and layer"),
            "One text, token by token (rows) through the MoE layers (columns), coloured by top-1 expert.",
        )

    steps.append(("trajectories", do_traj))

    # 6. specialisation -----------------------------------------------------------------------
    def do_spec() -> None:
        sec = o.section(
            "Specialisation",
            f"Share of a group's tokens whose top-{k} includes each expert; uniform = k/E = {k / num_e:.3f}."
            " Specialisation score = weighted mean total-variation distance between a group's expert"
            " distribution and the overall one (0 = none); the shuffled score (labels permuted) shows"
            " the level that finite samples alone produce.",
        )
        res: dict[str, Any] = {}
        views: list[tuple[str, Any]] = []
        try:
            views.append(("domain", specialization.by_domain(trace, seed=seed)))
        except AnalysisError as exc:
            o.numbers["skipped"]["specialisation by domain"] = str(exc)
        vocab_in = None
        for target in ("input", "next"):
            try:
                v = specialization.by_vocab(trace, target, min_count=min_count, seed=seed)
            except AnalysisError as exc:
                o.numbers["skipped"][f"vocabulary ({target})"] = str(exc)
                continue
            views.append((f"{target} token (N≥{min_count})", v.view))
            vocab_in = v if target == "input" else vocab_in
        if decode is not None:
            try:
                views.append(
                    ("token class", specialization.by_token_class(trace, decode, seed=seed))
                )
            except AnalysisError as exc:
                o.numbers["skipped"]["token class"] = str(exc)
        else:
            o.numbers["skipped"]["token class"] = (
                "no tokenizer given (pass --tokenizer) to decode token strings"
            )
        rows = []
        for name, view in views:
            res[name] = {
                "specialization": view.specialization.tolist(),
                "specialization_shuffled": view.specialization_shuffled.tolist(),
                "mean_max_share": view.mean_max_share.tolist(),
                "groups": len(view.names),
            }
            rows.append(
                {
                    "grouping": name,
                    "groups": len(view.names),
                    "specialisation (mean)": float(view.specialization.mean()),
                    "shuffled": float(view.specialization_shuffled.mean()),
                    "mean max share": float(view.mean_max_share.mean()),
                    "max share, shuffled": float(view.mean_max_share_shuffled.mean()),
                }
            )
            summary.append(
                {
                    "analysis": f"specialisation by {name} (mean TV distance)",
                    "value": float(view.specialization.mean()),
                    "chance": 0.0,
                    "shuffle baseline": float(view.specialization_shuffled.mean()),
                }
            )
        o.numbers["specialization"] = res
        o.csv("specialization", rows)
        if sec is not None:
            sec.table(rows, "Mean over layers.")
        if views:
            o.png(
                sec,
                "specialization",
                plots.lines(
                    layers_x,
                    {f"{n_}": v.specialization for n_, v in views}
                    | {f"{n_}, shuffled": v.specialization_shuffled for n_, v in views},
                    "Specialisation per layer",
                    "MoE layer",
                    "TV distance",
                    {"none": 0.0},
                    dashed=[f"{n_}, shuffled" for n_, _ in views],
                ),
                "",
            )
        for name, view in views:
            if name in ("domain", "token class") and len(view.names) >= 1:
                layer = num_l // 2
                o.png(
                    sec,
                    f"specialization_{name.replace(' ', '_')}",
                    plots.heatmap(
                        view.share[:, layer, :],
                        f"Share by {name}, layer {layer}",
                        "expert",
                        name,
                        center=k / num_e,
                        yticklabels=view.names,
                    ),
                    f"White = k/E = {k / num_e:.3f}.",
                )
        if vocab_in is not None:
            layer = num_l // 2
            tt = specialization.top_tokens(vocab_in, layer, top=8, decode=decode)
            trows = [
                {
                    "expert": e,
                    "top tokens (share of their occurrences routed here)": ", ".join(
                        f"{(s if s else tid)!r} {sh:.2f}" for tid, s, sh, _ in lst
                    ),
                }
                for e, lst in enumerate(tt)
            ]
            o.numbers["top_tokens_mid_layer"] = trows
            if sec is not None:
                sec.table(
                    trows,
                    f"Layer {layer}: tokens (N≥{min_count}) most often routed to each expert.",
                )

    steps.append(("specialisation", do_spec))

    # 7. predictability -----------------------------------------------------------------------
    def do_pred() -> None:
        pr = predictability.predictability(trace, min_count=min_count, seed=seed)
        rows = _per_layer(
            acc_token=pr.acc_token,
            acc_prev_token=pr.acc_bigram,
            acc_majority=pr.acc_majority,
            acc_token_shuffled=pr.acc_token_shuffled,
            recall_token=pr.recall_token,
            recall_prev_token=pr.recall_bigram,
            h_set_given_token=pr.cond_entropy,
            h_set=pr.set_entropy,
            h_given_shuffled_token=pr.cond_entropy_shuffled,
        )
        o.numbers["predictability"] = {
            "per_layer": rows,
            "chance": pr.chance,
            "n_train": pr.n_train,
            "n_test": pr.n_test,
        }
        o.csv("predictability", rows)
        summary.append(
            {
                "analysis": "held-out set accuracy from token id (mean)",
                "value": float(pr.acc_token.mean()),
                "chance": pr.chance,
                "shuffle baseline": float(pr.acc_token_shuffled.mean()),
            }
        )
        summary.append(
            {
                "analysis": "held-out set accuracy from (previous, current) id",
                "value": float(pr.acc_bigram.mean()),
                "chance": pr.chance,
                "shuffle baseline": float("nan"),
            }
        )
        summary.append(
            {
                "analysis": "held-out set accuracy of always the majority set",
                "value": float(pr.acc_majority.mean()),
                "chance": pr.chance,
                "shuffle baseline": float("nan"),
            }
        )
        sec = o.section(
            "Predictability from the token id",
            "Accuracy on held-out documents of predicting the exact top-k set as the set most often seen"
            " with this token id (or previous+current ids) in the training documents. Chance:"
            f" 1/C(E,k) = {pr.chance:.4f}; the majority line always predicts the most common set; the"
            " shuffled line fits the rule on permuted token ids.",
        )
        o.png(
            sec,
            "predictability",
            plots.lines(
                layers_x,
                {
                    "token id": pr.acc_token,
                    "(prev, cur) ids": pr.acc_bigram,
                    "majority set": pr.acc_majority,
                    "shuffled token ids": pr.acc_token_shuffled,
                },
                "Held-out exact-set accuracy",
                "MoE layer",
                "accuracy",
                {"1/C(E,k)": pr.chance},
                dashed=["majority set", "shuffled token ids"],
            ),
            "",
        )
        o.png(
            sec,
            "conditional_entropy",
            plots.lines(
                layers_x,
                {
                    "H(set)": pr.set_entropy,
                    "H(set | token)": pr.cond_entropy,
                    "H(set | shuffled token)": pr.cond_entropy_shuffled,
                },
                f"Information in the token id (tokens with N≥{min_count})",
                "MoE layer",
                "bits",
                dashed=["H(set | shuffled token)"],
            ),
            "The gap between H(set) and H(set | token) is the information the token id carries; the shuffled"
            " line shows the plug-in estimator's downward bias.",
        )
        sp = predictability.spread_token_vs_position(trace, min_count=min_count, seed=seed)
        srows = _per_layer(
            consistency_token=sp.consistency_token,
            consistency_position=sp.consistency_position,
            consistency_shuffled=sp.consistency_shuffled,
            h_norm_token=sp.norm_cond_entropy_token,
            h_norm_position=sp.norm_cond_entropy_position,
        )
        o.numbers["spread"] = {"per_layer": srows, "chance": sp.chance}
        o.csv("spread", srows)
        o.png(
            sec,
            "spread",
            plots.lines(
                layers_x,
                {
                    "grouped by token id": sp.consistency_token,
                    "grouped by position": sp.consistency_position,
                    "token ids shuffled": sp.consistency_shuffled,
                },
                "Top-1 consistency within groups (OpenMoE comparison)",
                "MoE layer",
                "share of group's most common top-1",
                {"1/E": sp.chance},
                dashed=["token ids shuffled"],
            ),
            "If routing is context-independent and token-based (as OpenMoE found), tokens with the same id agree"
            " far more than tokens at the same position.",
        )

    steps.append(("predictability", do_pred))

    # 8. saturation ---------------------------------------------------------------------------
    if compare is not None:

        def do_sat() -> None:
            sr = saturation.router_saturation(compare, trace, seed=seed)
            cols = {f"saturation_k{kk}": sr.saturation[kk] for kk in sr.ks}
            cols |= {f"shuffled_k{kk}": sr.shuffled[kk] for kk in sr.ks}
            rows = _per_layer(**cols)
            o.numbers["saturation"] = {
                "per_layer": rows,
                "chance": {str(kk): v for kk, v in sr.chance.items()},
            }
            o.csv("saturation", rows)
            sec = o.section(
                "Router saturation (OLMoE Eq. 5)",
                "Share of the final checkpoint's top-k experts the earlier checkpoint already picks for the"
                " same token; chance k/E.",
            )
            o.png(
                sec,
                "saturation",
                plots.lines(
                    layers_x,
                    {f"k={kk}": sr.saturation[kk] for kk in sr.ks},
                    "Router saturation",
                    "MoE layer",
                    "saturation",
                    {f"k/E, k={kk}": sr.chance[kk] for kk in sr.ks},
                ),
                "",
            )

        steps.append(("router saturation", do_sat))

    # 9. projections --------------------------------------------------------------------------
    if do_projections:

        def do_proj() -> None:
            codes, lab = np.unique(trace.domain, return_inverse=True)
            dn = meta.domains
            names = [dn[c] if 0 <= c < len(dn) else f"domain {c}" for c in codes.tolist()]
            what = "domain"
            if len(names) < 2 and decode is not None:
                uniq, inv = np.unique(trace.token_id, return_inverse=True)
                cls = np.array(
                    [
                        specialization.TOKEN_CLASSES.index(
                            specialization.token_class(decode(int(t)))
                        )
                        for t in uniq
                    ]
                )
                lab = cls[inv]
                names, what = list(specialization.TOKEN_CLASSES), "token class"
            pj = projections.projections(
                trace, lab.astype(np.int64), names, max_points=max_points, seed=seed
            )
            o.numbers["projections"] = {
                "label": what,
                "knn_accuracy": pj.knn_accuracy,
                "knn_shuffled": pj.knn_shuffled,
                "silhouette": pj.silhouette,
                "chance": pj.chance,
                "skipped": pj.skipped,
            }
            sec = o.section(
                "Projections of router probability vectors",
                f"Each point is a token's router probabilities over all layers and experts, projected to 2-D,"
                f" coloured by {what}. 5-NN accuracy (chance = majority share {pj.chance:.3f}) and silhouette"
                " (0 = no separation) say how well routing separates the groups.",
            )
            if sec is not None:
                sec.table(
                    [
                        {
                            "space": m,
                            "kNN accuracy": pj.knn_accuracy[m],
                            "kNN, labels shuffled": pj.knn_shuffled[m],
                            "silhouette": pj.silhouette[m],
                        }
                        for m in pj.knn_accuracy
                    ]
                )
                for m, why in pj.skipped.items():
                    sec.text(f"{m}: skipped — {why}")
            for m, z in pj.coords.items():
                o.plotly(
                    sec,
                    f"projection_{m}",
                    plots.scatter_plotly(z, pj.labels, pj.label_names, f"{m.upper()} by {what}"),
                    "",
                )
                o.png(
                    None,
                    f"projection_{m}",
                    plots.scatter(z, pj.labels, pj.label_names, f"{m.upper()} by {what}"),
                    "",
                )

        steps.append(("projections", do_proj))

    with Progress(transient=True) as prog:
        task = prog.add_task("analysing", total=len(steps))
        for name, fn in steps:
            prog.update(task, description=name)
            try:
                fn()
            except AnalysisError as exc:
                skip(name, exc)
            prog.advance(task)

    o.numbers["summary"] = summary
    if rep is not None:
        rep.add_summary(summary)
        if o.numbers["skipped"]:
            sec = rep.section(
                "Skipped analyses", "Analyses that could not run on this trace, and why."
            )
            sec.table([{"analysis": a, "reason": r} for a, r in o.numbers["skipped"].items()])
        rep.write(out / "report.html")
        o.files.append("report.html")
        from moelab.report.persist import save_sections

        save_sections(rep, out / "sections.json")  # lets a later report (moelab demo) reuse them
        o.files.append("sections.json")
    o.csv("summary", summary)
    o.numbers["files"] = o.files
    numbers = _finite(o.numbers)
    atomic_write_json(out / "numbers.json", numbers)
    return numbers
