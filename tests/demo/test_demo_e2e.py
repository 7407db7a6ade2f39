"""End to end: `moelab demo --quick` in a fresh folder produces every stage's output and a report
with every section; a second run reuses the cached stages; the README's commands are the ones
CI runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "THP_MEM_ALLOC_ENABLE": "1"}
    cmd = [sys.executable, "-m", "moelab.cli", "demo", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first.stdout, second.stdout


def test_every_stage_output_exists(demo_run):
    out, _, _ = demo_run
    for stage in ("train", "trace", "analyze", "predict", "offload"):
        assert (out / stage / "done.json").exists(), stage
    assert (out / "train" / "moe" / "model" / "model.safetensors").exists()
    assert (out / "train" / "dense" / "model" / "model.safetensors").exists()
    assert (out / "train" / "compare.png").exists()
    assert (out / "trace" / "test" / "meta.json").exists()
    assert (out / "trace" / "test" / "gates.safetensors").exists()
    assert (out / "analyze" / "numbers.json").exists()
    assert (out / "analyze" / "sections.json").exists()
    assert (out / "predict" / "all_results.json").exists()
    assert (out / "offload" / "replay.json").exists()
    assert (out / "offload" / "live.json").exists()


def test_summary_headline_numbers_are_real(demo_run):
    out, stdout, _ = demo_run
    s = json.loads((out / "summary.json").read_text())
    h = s["headline"]
    assert h["perplexity"]["moe"] < h["perplexity"]["unigram"] * 1.5
    assert 0 < h["balance"]["normalized_entropy_mean"] <= 1
    assert 0 <= h["repeat_rate"]["same_top1"] <= 1 and h["repeat_rate"]["chance_top1"] > 0
    assert 0 < h["predictor"]["best_recall_at_k"] <= 1 and h["predictor"]["split"] == "test"
    assert h["offload"]["identical_to_all_resident"] is True
    assert "headline numbers" in stdout and "report.html" in stdout


def test_report_has_every_section_and_is_self_contained(demo_run):
    out, _, _ = demo_run
    page = (out / "report.html").read_text()
    for title in ("Summary", "1. Training", "2.1 ", "3. Expert predictors", "4. Offloading"):
        assert title in page, title
    assert "analysis sections missing" not in page
    assert not re.search(r'<script[^>]+src="http', page)  # nothing fetched from the network
    assert page.count("data:image/png;base64") >= 5


def test_second_run_reuses_every_stage(demo_run):
    _, _, second = demo_run
    for stage in ("train", "trace", "analyze", "predict", "offload"):
        assert f"{stage}: done earlier" in second


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", readme, re.S).group(1)
    cmds = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert cmds == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert [
        ln
        for ln in ci.splitlines()
        if ln and not ln.startswith("#") and not ln.startswith("set ") and not ln.startswith("cd ")
    ] == ["make test"]
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: .*\n\t\$\(BIN\)/moelab demo$", mk, re.M)
    assert "pytest" in mk.split("\ntest:")[1].split("\n\n")[0]


def test_report_renders_in_headless_chromium(demo_run):
    from moelab.report.browser import check_page, find_chromium

    if find_chromium() is None:
        pytest.skip(
            "Chromium is not installed (Debian package `chromium`; `make corpora` installs it)"
        )
    out, _, _ = demo_run
    page = (out / "report.html").read_text()
    check = check_page(out / "report.html")
    assert check.errors == [], check.errors  # loads offline with no console/JS errors
    n_img = page.count("<img ")
    assert check.dom.count("<img") >= n_img  # every PNG figure is in the rendered page
    n_plotly = page.count("plotly-fig")
    assert check.dom.count('class="main-svg"') >= n_plotly  # every plotly figure drew itself
    assert check.nonblank_fraction > 0.02
