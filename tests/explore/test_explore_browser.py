"""The explorer page in headless Chromium (Playwright driving the system Chromium): search a
token, read the heatmap numbers shown on the page, compare them with a DuckDB query over the
same store; a link reproduces the view; an unknown token shows a message."""

from __future__ import annotations

import socket
import threading
import time

import duckdb
import numpy as np
import pytest
from explore_testutil import CAN, I_, SPACE_CAN

from moelab.report.browser import find_chromium

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="Chromium is not installed (Debian package `chromium`)"
)


def _duckdb_heatmap(store, token, prev=None):
    """[L, E] counts by plain DuckDB over the shards (independent of the explorer's cache)."""
    con = duckdb.connect()
    glob = str(store / "shards" / "*.parquet")
    out = np.zeros((3, 8), np.int64)
    for layer in range(3):
        q = (
            f"WITH r AS (SELECT *, lag(token_id) OVER (PARTITION BY doc_id ORDER BY position)"
            f" AS p FROM read_parquet(?))"
            f" SELECT e, count(*) FROM (SELECT unnest([e{layer}_0, e{layer}_1]) AS e FROM r"
            f" WHERE token_id = ? AND NOT is_bos AND (? IS NULL OR p = ?)) WHERE e <> 255"
            f" GROUP BY e"
        )
        for e, c in con.execute(q, [glob, token, prev, prev]).fetchall():
            out[layer, int(e)] = int(c)
    return out


@pytest.fixture(scope="module")
def server(explorer):
    import uvicorn

    from moelab.explore.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(explorer), host="127.0.0.1", port=port, log_level="warning")
    )
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        if time.time() - t0 > 30:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)


def _table(page):
    return page.eval_on_selector_all(
        "#heatmap-table td",
        "els => els.map(e => [Number(e.dataset.layer), Number(e.dataset.expert), Number(e.textContent)])",
    )


def _grid(cells):
    out = np.zeros((3, 8), np.int64)
    for layer, e, c in cells:
        out[layer, e] = c
    return out


def test_search_token_heatmap_matches_duckdb(server, store):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server + "/")
            page.wait_for_selector("#domain option[value=domain1]", state="attached")
            page.fill("#q", "can")
            page.click("#go")
            page.wait_for_selector("#heatmap-table td")
            # "can" matches "can" and " can": the page shows the more frequent one
            want_id = (
                CAN
                if _duckdb_heatmap(store, CAN).sum() >= _duckdb_heatmap(store, SPACE_CAN).sum()
                else SPACE_CAN
            )
            want = _duckdb_heatmap(store, want_id)
            got = _grid(_table(page))
            assert np.array_equal(got, want), (got, want)
            # the plotly figure shows the same numbers
            text = page.evaluate("document.getElementById('heatmap-plot').data[0].text")
            assert np.array_equal(np.array(text, dtype=np.int64), want)
            n = int(page.get_attribute("#summary", "data-n"))
            assert n == want[0].sum() // 2
            assert page.eval_on_selector_all("#sankey-plot .sankey", "e => e.length") == 1
            assert page.eval_on_selector_all(".ctx mark", "e => e.length") > 0
            assert "held-out" in page.inner_text("#pred-caption")

            # "I can": two tokens -> "can" after "I"; the link reproduces the view
            page.fill("#q", "I can")
            page.click("#go")
            page.wait_for_function(
                "document.getElementById('note').textContent.includes('2 tokens')"
            )
            page.wait_for_function(
                f"document.getElementById('summary').dataset.n == {int(_duckdb_heatmap(store, CAN, I_)[0].sum() // 2)}"
            )
            got2 = _grid(_table(page))
            assert np.array_equal(got2, _duckdb_heatmap(store, CAN, I_))
            link = page.get_attribute("#permalink", "href")
            assert f"token={CAN}" in link and f"prev={I_}" in link
            page2 = browser.new_page()
            page2.goto(server + link)
            page2.wait_for_selector("#heatmap-table td")
            assert np.array_equal(_grid(_table(page2)), got2)

            # an unknown token: a message on the page, no figures
            page.fill("#q", "zzz")
            page.click("#go")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "zzz" in page.inner_text("#error")
            assert page.eval_on_selector_all("#heatmap-table td", "e => e.length") == 0
            errors = [e for e in errors if "404" not in e]  # the failed search request itself
            assert errors == [], errors
        finally:
            browser.close()
