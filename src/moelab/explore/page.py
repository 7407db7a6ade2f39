"""The single page of `moelab explore` (HTML + plain JavaScript + plotly.js, no build step).

The page reads its view from the URL query (token, prev, next, domain, la, lb, norm,
min_count, top, min_fit, heat), resolves token text through /api/search, asks the JSON
endpoints in parallel and draws plotly figures; the URL is updated on every view so a link
reproduces it. Decoded text is inserted with textContent only (never as HTML).
"""

from __future__ import annotations

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>moelab explore</title>
<script src="/static/plotly.min.js"></script>
<style>
body{font-family:system-ui,sans-serif;margin:1em 2em;color:#222}
form{display:flex;flex-wrap:wrap;gap:.6em 1.2em;align-items:end;background:#f4f6f8;padding:.8em;border-radius:6px}
label{display:flex;flex-direction:column;font-size:.85em}
input,select{font-size:1em;padding:.2em}
input.tok{width:9em} input.num{width:5em}
#error{color:#a00;font-weight:bold;margin:.6em 0;white-space:pre-wrap}
#note{color:#555;margin:.3em 0}
section{margin:1.2em 0;border-top:1px solid #ddd}
table{border-collapse:collapse;font-size:.8em;margin:.4em 0}
td,th{border:1px solid #ccc;padding:.15em .4em;text-align:right}
.ctx{font-family:monospace;white-space:pre-wrap;margin:.25em 0;padding:.2em .4em;background:#fafafa}
.ctx mark{background:#ffd54f;font-weight:bold}
.meta{color:#777;font-size:.8em}
.alt a{margin-right:.8em}
</style></head>
<body>
<h1>moelab explore</h1>
<p id="store" class="meta"></p>
<form id="f">
<label>token (text or #id)<input id="q" class="tok" autocomplete="off"></label>
<label>previous token<input id="prev" class="tok" autocomplete="off"></label>
<label>next token<input id="next" class="tok" autocomplete="off"></label>
<label>domain<select id="domain"><option value="">all</option></select></label>
<label>heatmap<select id="heat"><option value="share">share</option><option value="counts">counts</option><option value="ratio">share / chance</option></select></label>
<label>layer A<select id="la"></select></label>
<label>layer B<select id="lb"></select></label>
<label>normalise<select id="norm"><option value="row">row P(j|i)</option><option value="column">column P(i|j)</option><option value="joint">joint P(i,j)</option><option value="lift">lift</option></select></label>
<label>min count<input id="min_count" class="num" type="number" min="1" value="1"></label>
<label>top paths<input id="top" class="num" type="number" min="1" max="100" value="10"></label>
<label>predictor min fit<input id="min_fit" class="num" type="number" min="1" value="5"></label>
<button id="go" type="submit">show</button>
</form>
<div id="error" role="alert"></div>
<div id="note"></div>
<div id="alts" class="alt"></div>
<p id="summary"></p>
<p><a id="permalink" href="#">link to this view</a></p>
<section><h2>Experts per layer</h2><p class="meta" id="heat-caption"></p>
<div id="heatmap-plot"></div><table id="heatmap-table"></table></section>
<section><h2>Top trajectories (top-1 expert per layer)</h2><p class="meta" id="traj-caption"></p>
<div id="sankey-plot"></div><table id="paths-table"></table></section>
<section><h2>Co-occurrence between two layers</h2><p class="meta" id="cooc-caption"></p>
<div id="cooc-plot"></div></section>
<section><h2>Predictor hit rate (recall@k)</h2><p class="meta" id="pred-caption"></p>
<div id="pred-plot"></div><table id="pred-table"></table></section>
<section><h2>Occurrences in context</h2><p class="meta" id="ctx-caption"></p><div id="contexts"></div></section>
<script>
"use strict";
let INFO = null;
const $ = (id) => document.getElementById(id);
const PARAMS = ["la", "lb", "norm", "min_count", "top", "min_fit", "heat"];

function setText(id, text) { $(id).textContent = text; }
function fmt(x, d) { return (x === null || x === undefined) ? "–" : Number(x).toFixed(d); }

async function getJSON(url) {
  const r = await fetch(url);
  let body = null;
  try { body = await r.json(); } catch (e) { body = {detail: "HTTP " + r.status}; }
  if (!r.ok) { const err = new Error(body.detail || ("HTTP " + r.status)); err.status = r.status; throw err; }
  return body;
}

function fillTable(table, header, rows) {
  table.textContent = "";
  const tr = document.createElement("tr");
  for (const h of header) { const th = document.createElement("th"); th.textContent = h; tr.appendChild(th); }
  table.appendChild(tr);
  for (const row of rows) {
    const r = document.createElement("tr");
    for (const c of row) {
      const td = document.createElement(c.th ? "th" : "td");
      td.textContent = c.text;
      for (const [k, v] of Object.entries(c.data || {})) td.dataset[k] = v;
      if (c.title) td.title = c.title;
      r.appendChild(td);
    }
    table.appendChild(r);
  }
}

async function resolve(text, role) {
  text = (text || "");
  if (text.trim() === "") return null;
  const m = text.trim().match(/^#(\d+)$/);
  if (m) return {id: Number(m[1]), alts: [], seq: []};
  const res = await getJSON("/api/search?q=" + encodeURIComponent(text));
  const found = res.matches.filter((r) => r.count > 0);
  if (found.length) return {id: found[0].id, alts: found, seq: res.sequence};
  if (res.sequence.length > 1) return {id: null, alts: [], seq: res.sequence};
  throw new Error(role + " " + JSON.stringify(text) + ": no such token occurs in this trace");
}

function viewQuery(v) {
  const p = new URLSearchParams();
  p.set("token", v.token);
  if (v.prev !== null) p.set("prev", v.prev);
  if (v.next !== null) p.set("next", v.next);
  if (v.domain) p.set("domain", v.domain);
  return p;
}

function clearViews() {
  for (const id of ["heatmap-plot", "sankey-plot", "cooc-plot", "pred-plot"]) { try { Plotly.purge($(id)); } catch (e) {} $(id).textContent = ""; }
  for (const id of ["heatmap-table", "paths-table", "pred-table", "contexts"]) $(id).textContent = "";
  for (const id of ["summary", "heat-caption", "traj-caption", "cooc-caption", "pred-caption", "ctx-caption"]) setText(id, "");
}

async function run(pushUrl) {
  setText("error", ""); setText("note", ""); $("alts").textContent = "";
  $("go").disabled = true;
  try {
    const tok = await resolve($("q").value, "token");
    if (tok === null) throw new Error("enter a token (its text, or #id)");
    let prev = await resolve($("prev").value, "previous token");
    const next = await resolve($("next").value, "next token");
    for (const [r, role] of [[prev, "previous token"], [next, "next token"]]) {
      if (r !== null && r.id === null) throw new Error(role + ": the text is " + r.seq.length + " tokens; give one token (or #id)");
    }
    let tid = tok.id;
    if (tid === null) {
      const s = tok.seq;
      tid = s[s.length - 1].id;
      if (prev === null) prev = {id: s[s.length - 2].id};
      setText("note", JSON.stringify($("q").value) + " is " + s.length + " tokens (" +
        s.map((t) => JSON.stringify(t.text)).join(" ") + "): showing the last one after the one before it");
    }
    if (tok.alts.length > 1) {
      const box = $("alts"); box.append("other tokens with this text: ");
      for (const a of tok.alts.slice(1)) {
        const l = document.createElement("a"); l.href = "#"; l.textContent = JSON.stringify(a.text) + " #" + a.id + " (" + a.count + ")";
        l.onclick = (e) => { e.preventDefault(); $("q").value = "#" + a.id; run(true); }; box.appendChild(l);
      }
    }
    const v = {token: tid, prev: prev ? prev.id : null, next: next ? next.id : null, domain: $("domain").value};
    await show(v, pushUrl);
  } catch (e) {
    clearViews();
    setText("error", e.message);
  } finally {
    $("go").disabled = false;
  }
}

async function show(v, pushUrl) {
  const base = viewQuery(v);
  const p = (extra) => { const q = new URLSearchParams(base); for (const [k, x] of Object.entries(extra)) q.set(k, x); return q.toString(); };
  const la = $("la").value, lb = $("lb").value, norm = $("norm").value;
  const [heat, traj, cooc, pred, ctx] = await Promise.all([
    getJSON("/api/heatmap?" + p({})),
    getJSON("/api/trajectories?" + p({top: $("top").value})),
    getJSON("/api/cooccurrence?" + p({la: la, lb: lb, norm: norm === "lift" ? "joint" : norm, min_count: $("min_count").value})),
    getJSON("/api/predictor?" + p({min_fit: $("min_fit").value})),
    getJSON("/api/contexts?" + p({})),
  ]);
  const url = new URLSearchParams(base);
  for (const k of PARAMS) url.set(k, $(k).value);
  const href = location.pathname + "?" + url.toString();
  $("permalink").href = href;
  if (pushUrl) history.pushState(null, "", href); else history.replaceState(null, "", href);
  $("summary").textContent = heat.n + " occurrences of " + heat.label;
  $("summary").dataset.n = heat.n;
  drawHeatmap(heat);
  drawSankey(traj);
  drawCooc(cooc, norm === "lift");
  drawPredictor(pred);
  drawContexts(ctx);
}

function drawHeatmap(h) {
  const mode = $("heat").value;
  const z = mode === "counts" ? h.counts : (mode === "ratio" ? h.ratio : h.share);
  const L = h.counts.length, E = h.counts[0].length;
  const ys = [...Array(L).keys()].map((l) => "layer " + l), xs = [...Array(E).keys()].map((e) => "e" + e);
  const text = h.counts.map((r) => r.map(String));
  Plotly.newPlot("heatmap-plot", [{type: "heatmap", z: z, x: xs, y: ys, text: text, texttemplate: "%{text}",
    colorscale: "Viridis", hovertemplate: "%{y} %{x}<br>count %{text}<br>" + mode + " %{z:.3f}<extra></extra>"}],
    {height: 120 + 28 * L, margin: {t: 10, l: 70}, yaxis: {autorange: "reversed"}}, {responsive: true});
  setText("heat-caption", h.n + " occurrences; a cell = occurrences routed to the expert in any of the k slots; share = count / n; chance k/E = " + fmt(h.chance, 4));
  fillTable($("heatmap-table"), ["layer", ...xs], h.counts.map((row, l) => [{text: String(l), th: true},
    ...row.map((c, e) => ({text: String(c), data: {layer: l, expert: e}, title: "share " + fmt(h.share[l][e], 4)}))]));
}

function drawSankey(t) {
  const L = t.paths[0].length, nodes = new Map(), labels = [], link = new Map();
  const node = (l, e) => { const k = l + ":" + e; if (!nodes.has(k)) { nodes.set(k, labels.length); labels.push("L" + l + " " + (e < 0 ? "drop" : "e" + e)); } return nodes.get(k); };
  t.paths.forEach((path, i) => { for (let l = 0; l + 1 < L; l++) { const a = node(l, path[l]), b = node(l + 1, path[l + 1]); const k = a + ">" + b; link.set(k, (link.get(k) || 0) + t.counts[i]); } });
  if (L === 1) t.paths.forEach((path) => node(0, path[0]));
  const src = [], dst = [], val = [];
  for (const [k, x] of link) { const [a, b] = k.split(">").map(Number); src.push(a); dst.push(b); val.push(x); }
  Plotly.newPlot("sankey-plot", [{type: "sankey", node: {label: labels, pad: 12}, link: {source: src, target: dst, value: val}}],
    {height: 360, margin: {t: 10}}, {responsive: true});
  setText("traj-caption", t.n + " occurrences; " + t.n_paths + " distinct paths; the top " + t.paths.length + " cover " + fmt(100 * t.covered, 1) + "% (top-1 = the highest-weight slot)");
  fillTable($("paths-table"), ["count", "share", ...[...Array(L).keys()].map((l) => "L" + l)],
    t.paths.map((path, i) => [{text: String(t.counts[i])}, {text: fmt(t.counts[i] / t.n, 4)}, ...path.map((e) => ({text: e < 0 ? "drop" : String(e)}))]));
}

function drawCooc(c, lift) {
  const z = lift ? c.lift : c.value;
  const E = c.counts.length, xs = [...Array(E).keys()].map((e) => "e" + e);
  const text = c.counts.map((r) => r.map(String));
  Plotly.newPlot("cooc-plot", [{type: "heatmap", z: z, x: xs, y: xs, text: text, texttemplate: "%{text}", colorscale: "Blues",
    hovertemplate: "layer " + c.la + " %{y} -> layer " + c.lb + " %{x}<br>count %{text}<br>" + (lift ? "lift" : c.norm) + " %{z:.3f}<extra></extra>"}],
    {height: 160 + 26 * E, margin: {t: 10, l: 60}, xaxis: {title: {text: "expert at layer " + c.lb}}, yaxis: {title: {text: "expert at layer " + c.la}, autorange: "reversed"}}, {responsive: true});
  setText("cooc-caption", c.n + " occurrences, " + c.pairs + " expert pairs (all k x k slot pairs); colour = " + (lift ? "lift P(i,j)/(P(i)P(j))" : c.norm + " normalised") +
    "; cells with count < " + c.min_count + " left blank (" + c.masked + " cells); numbers = counts");
}

function drawPredictor(p) {
  setText("pred-caption", "fitted on " + p.fit_on + " (" + p.n_train + " occurrences of the token, all contexts); scored on " + p.scored_on +
    " (" + p.n_scored + " of the " + p.n + " matching occurrences). prior = the token's most frequent k experts per layer; with previous token = most frequent k after that previous token when seen >= " +
    p.min_fit + " times, else the prior" + (p.backoff === null ? "" : " (backed off on " + fmt(100 * p.backoff, 1) + "%)") + ". Chance k/E = " + fmt(p.chance, 4) + (p.note ? ". " + p.note : ""));
  if (p.prior === null) { Plotly.purge("pred-plot"); $("pred-table").textContent = ""; return; }
  const xs = p.prior.map((_, l) => "layer " + l);
  Plotly.newPlot("pred-plot", [{type: "bar", name: "token prior", x: xs, y: p.prior}, {type: "bar", name: "with previous token", x: xs, y: p.context},
    {type: "scatter", mode: "lines", name: "chance k/E", x: xs, y: xs.map(() => p.chance), line: {dash: "dash"}}],
    {height: 320, margin: {t: 10}, yaxis: {range: [0, 1], title: {text: "recall@k (held-out)"}}}, {responsive: true});
  fillTable($("pred-table"), ["", ...xs, "mean"], [
    [{text: "token prior", th: true}, ...p.prior.map((x) => ({text: fmt(x, 4)})), {text: fmt(p.prior_mean, 4)}],
    [{text: "with previous token", th: true}, ...p.context.map((x) => ({text: fmt(x, 4)})), {text: fmt(p.context_mean, 4)}]]);
}

function drawContexts(c) {
  const box = $("contexts"); box.textContent = "";
  setText("ctx-caption", c.rows.length + " of " + c.n + " occurrences (a fixed hash-ordered sample)");
  for (const r of c.rows) {
    const d = document.createElement("div"); d.className = "ctx";
    const m = document.createElement("span"); m.className = "meta"; m.textContent = "doc " + r.doc_id + " pos " + r.position + " [" + r.domain + "]  ";
    const mark = document.createElement("mark"); mark.textContent = r.token;
    d.append(m, r.left, mark, r.right); box.appendChild(d);
  }
}

async function init() {
  try { INFO = await getJSON("/api/info"); } catch (e) { setText("error", e.message); return; }
  setText("store", INFO.path + " — " + INFO.model + " (" + INFO.family + "): " + INFO.tokens + " tokens, " + INFO.num_layers + " MoE layers, top-" + INFO.top_k + " of " + INFO.num_experts + " experts" +
    (INFO.tokenizer ? "" : ". No tokenizer: search by #id. " + INFO.tokenizer_note) + ". Frequent: " + INFO.frequent.map((t) => JSON.stringify(t.text) + " #" + t.id).join(", "));
  for (const d of INFO.domains) { const o = document.createElement("option"); o.value = d; o.textContent = d; $("domain").appendChild(o); }
  for (const id of ["la", "lb"]) for (let l = 0; l < INFO.num_layers; l++) { const o = document.createElement("option"); o.value = l; o.textContent = l; $(id).appendChild(o); }
  $("lb").value = String(Math.min(1, INFO.num_layers - 1));
  fromUrl();
}

function fromUrl() {
  const u = new URLSearchParams(location.search);
  for (const k of PARAMS) if (u.has(k)) $(k).value = u.get(k);
  $("domain").value = u.get("domain") || "";
  $("q").value = u.has("token") ? "#" + u.get("token") : "";
  $("prev").value = u.has("prev") ? "#" + u.get("prev") : "";
  $("next").value = u.has("next") ? "#" + u.get("next") : "";
  if (u.has("token")) run(false);
}

$("f").addEventListener("submit", (e) => { e.preventDefault(); run(true); });
window.addEventListener("popstate", fromUrl);
init();
</script>
</body></html>
"""
