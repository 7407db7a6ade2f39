"""FastAPI app of `moelab explore`: a page plus JSON endpoints over one trace store.

GET /                  the page (plotly.js served from the installed plotly package: offline)
GET /api/info          trace shape, domains, split used for predictor scores, frequent tokens
GET /api/search        token ids for a text (through the trace's tokenizer) or an id
GET /api/heatmap       per-layer expert counts / share vs chance k/E
GET /api/trajectories  top top-1 paths across layers (Sankey)
GET /api/cooccurrence  expert pairs between two layers, row / column / joint, lift, min-count
GET /api/predictor     recall@k of the token prior vs previous-token table, held-out split
GET /api/contexts      occurrences in context

Every view answers with `n`, the number of occurrences behind it. Bad input answers 4xx with
{"detail": message} (422 malformed parameter, 400 invalid value, 404 nothing found); query
parameters reach DuckDB only as bound values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from moelab.explore import queries as Q
from moelab.explore.queries import Explorer, Filters

MAX_ID = 2**31 - 1


def _js(x: Any) -> Any:
    """numpy -> JSON-able lists; NaN / inf -> None."""
    if isinstance(x, np.ndarray):
        return _js(x.tolist())
    if isinstance(x, dict):
        return {k: _js(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_js(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def create_app(explorer: Explorer) -> Any:
    """The FastAPI application serving `explorer`'s store."""
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    from moelab.errors import MoelabError
    from moelab.explore.page import PAGE

    ex = explorer
    app = FastAPI(title="moelab explore", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _bad_param(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")]
            got = err.get("input")
            shown = "" if got is None or isinstance(got, dict) else f" (got {str(got)[:60]!r})"
            msgs.append(f"parameter {'.'.join(loc) or '?'!r}: {err.get('msg', 'invalid')}{shown}")
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    @app.exception_handler(MoelabError)
    async def _moelab_error(request: Request, exc: MoelabError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=getattr(exc, "status", 400))

    def filters(
        token: int = Query(..., ge=0, le=MAX_ID, description="token id"),
        prev: int | None = Query(None, ge=0, le=MAX_ID, description="previous token id"),
        next: int | None = Query(None, ge=0, le=MAX_ID, description="next token id"),
        domain: str | None = Query(None, max_length=200, description="domain name"),
    ) -> Filters:
        return Filters(token, prev, next, domain or None)

    def head(f: Filters) -> dict[str, Any]:
        return {
            "filters": {"token": f.token, "prev": f.prev, "next": f.next, "domain": f.domain},
            "label": Q.describe(ex, f),
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/static/plotly.min.js")
    def plotly_js() -> FileResponse:
        return FileResponse(_plotly_js(), media_type="application/javascript")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        m = ex.meta
        return _js(
            {
                "path": str(ex.path),
                "model": m.model,
                "family": m.family,
                "num_layers": m.num_layers,
                "num_experts": m.num_experts,
                "top_k": m.top_k,
                "chance": m.top_k / m.num_experts,
                "domains": list(m.domains),
                "tokens": ex.num_rows,
                "tokenizer": ex.vocab.tokenizer is not None,
                "tokenizer_note": ex.vocab.note,
                "split": ex.split_note(),
                "frequent": [
                    {"id": i, "text": ex.token_label(i), "count": c}
                    for i, c in Q.top_tokens(ex, 12)
                ],
            }
        )

    @app.get("/api/search")
    def search(
        q: str | None = Query(None, max_length=200, description="token text"),
        id: int | None = Query(None, ge=0, le=MAX_ID, description="token id"),
    ) -> dict[str, Any]:
        if (q is None or q == "") == (id is None):
            raise Q.ExploreInputError("search: give exactly one of q (token text) or id")
        seq: list[int] = []
        if id is not None:
            ids = [int(id)]
        else:
            ids, seq = ex.vocab.search(q)
            if len(seq) == 1 and seq[0] not in ids:
                ids = [seq[0], *ids]
        counts = Q.token_counts(ex, ids)
        matches = sorted(
            ({"id": i, "text": ex.token_label(i), "count": counts[i]} for i in ids),
            key=lambda r: (-r["count"], r["id"]),
        )
        sequence = [{"id": i, "text": ex.token_label(i)} for i in seq] if len(seq) > 1 else []
        if not any(r["count"] for r in matches) and not sequence:
            what = f"token id {id}" if id is not None else f"the text {q!r}"
            if matches:
                raise Q.NotFoundError(
                    f"{what} is token(s) {[r['id'] for r in matches]} but none occurs in this trace"
                )
            raise Q.NotFoundError(f"no token of the trace's tokenizer decodes to {q!r}")
        return {"matches": matches, "sequence": sequence}

    @app.get("/api/heatmap")
    def heatmap(f: Filters = Depends(filters)) -> dict[str, Any]:
        return _js({**head(f), **Q.heatmap(ex, f)})

    @app.get("/api/trajectories")
    def trajectories(
        f: Filters = Depends(filters), top: int = Query(10, ge=1, le=Q.MAX_TOP)
    ) -> dict[str, Any]:
        return _js({**head(f), **Q.trajectories(ex, f, top)})

    @app.get("/api/cooccurrence")
    def cooccurrence(
        f: Filters = Depends(filters),
        la: int = Query(0, ge=0, le=100_000, description="first MoE layer"),
        lb: int = Query(1, ge=0, le=100_000, description="second MoE layer"),
        norm: str = Query("row", max_length=10, description="row | column | joint"),
        min_count: int = Query(1, ge=1, le=MAX_ID),
    ) -> dict[str, Any]:
        return _js(
            {**head(f), "la": la, "lb": lb, **Q.cooccurrence(ex, f, la, lb, norm, min_count)}
        )

    @app.get("/api/predictor")
    def predictor(
        f: Filters = Depends(filters), min_fit: int = Query(5, ge=1, le=MAX_ID)
    ) -> dict[str, Any]:
        return _js({**head(f), **Q.predictor(ex, f, min_fit)})

    @app.get("/api/contexts")
    def contexts(
        f: Filters = Depends(filters),
        limit: int = Query(8, ge=1, le=Q.MAX_CONTEXTS),
        width: int = Query(8, ge=0, le=Q.MAX_WIDTH),
    ) -> dict[str, Any]:
        return _js({**head(f), **Q.contexts(ex, f, limit, width)})

    return app
