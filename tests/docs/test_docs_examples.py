"""The user guide's examples run: every ```python block of docs/guide/*.md is executed, page by
page in its own namespace inside a temporary working directory (blocks marked ```python no-run
are skipped), and every `moelab ...` command line in a ```bash block uses only flags the CLI
really has."""

from __future__ import annotations

import re
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide"
README_BODY = ROOT / "docs" / "README_BODY.md"
PAGES = [
    "01-layers.md",
    "02-models-and-training.md",
    "03-data.md",
    "04-tracing.md",
    "05-analysis.md",
    "06-prediction.md",
    "07-offloading.md",
    "08-moefy.md",
    "09-explore.md",
    "10-experts.md",
]
FENCE = re.compile(r"^(`{3,})\s*([^`]*)$")


@dataclass
class Block:
    """One fenced code block of a Markdown page."""

    lang: str
    info: str
    line: int
    code: str


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block (```lang info) of a Markdown text, in order, with its first line."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if m is None:
            i += 1
            continue
        ticks, info = m.group(1), m.group(2).strip()
        start = i + 1
        j = start
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        if j == len(lines):
            raise AssertionError(f"unclosed ``` fence opened at line {i + 1}")
        words = info.split()
        blocks.append(
            Block(
                lang=words[0] if words else "",
                info=" ".join(words[1:]),
                line=i + 1,
                code="\n".join(lines[start:j]) + "\n",
            )
        )
        i = j + 1
    return blocks


def python_blocks(page: Path) -> list[Block]:
    """The page's ```python blocks that should run (not marked no-run)."""
    return [
        b
        for b in fenced_blocks(page.read_text())
        if b.lang == "python" and "no-run" not in b.info.split()
    ]


def test_fence_parser_finds_blocks_and_skips_no_run() -> None:
    text = (
        "intro\n```python\nx = 1\n```\n\n```python no-run\nraise SystemExit\n```\n"
        "````bash\nmoelab trace --model m\n````\n"
    )
    blocks = fenced_blocks(text)
    assert [(b.lang, b.info, b.line) for b in blocks] == [
        ("python", "", 2),
        ("python", "no-run", 6),
        ("bash", "", 9),
    ]
    assert blocks[0].code == "x = 1\n"
    assert blocks[2].code == "moelab trace --model m\n"
    with pytest.raises(AssertionError, match="unclosed"):
        fenced_blocks("```python\nx = 1\n")


def test_guide_has_every_stage_page() -> None:
    present = sorted(p.name for p in GUIDE.glob("*.md"))
    missing = [p for p in PAGES if p not in present]
    assert not missing, f"docs/guide/ lacks {missing}"
    for name in PAGES:
        page = GUIDE / name
        assert python_blocks(page), f"{name}: no runnable ```python example"
        assert "```bash" in page.read_text(), f"{name}: no CLI example"


def run_page(page: Path) -> None:
    """Run the page's python blocks in order in one fresh namespace (in the current directory);
    raise AssertionError naming the page, block number and line of the first failure."""
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for i, block in enumerate(python_blocks(page), start=1):
        try:
            code = compile(block.code, f"{page.name}:block{i}", "exec")
            exec(code, namespace)  # noqa: S102 - executing our own documentation examples
        except Exception as exc:
            raise AssertionError(
                f"{page.name} python block {i} (line {block.line}) failed:\n"
                f"{traceback.format_exc()}"
            ) from exc


def test_run_page_runs_in_order_and_names_the_failing_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "demo-page.md"
    page.write_text(
        "```python\nx = 2\n```\n```python no-run\nraise RuntimeError\n```\n"
        "```python\nopen('out.txt', 'w').write(str(x * 21))\n```\n"
    )
    run_page(page)  # the no-run block is skipped; the namespace carries x between blocks
    assert (tmp_path / "out.txt").read_text() == "42"
    page.write_text("```python\nx = 1\n```\n\n```python\n1 / 0\n```\n")
    with pytest.raises(AssertionError, match=r"demo-page.md python block 2 \(line 5\)"):
        run_page(page)


@pytest.mark.parametrize("name", PAGES)
def test_guide_examples_run(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in the examples land in tmp
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import torch

    # The examples are tiny: one intra-op thread avoids spin-waiting on a busy machine (10-40x
    # faster here on 2 shared cores) and is restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    try:
        run_page(GUIDE / name)
    except AssertionError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")


# ---- CLI lines in the docs use real commands and flags ------------------------------------


def _click_root():
    """The click command tree behind the typer app."""
    import typer.main

    from moelab.cli import app

    return typer.main.get_command(app)


def _options(cmd) -> set[str]:
    """Every option spelling of a click command (e.g. --logits, --no-logits)."""
    out = {"--help"}
    for p in cmd.params:
        out.update(o for o in getattr(p, "opts", []) if o.startswith("-"))
        out.update(o for o in getattr(p, "secondary_opts", []) if o.startswith("-"))
    return out


def moelab_invocations(text: str) -> list[tuple[int, list[str]]]:
    """(line, argv after `moelab`) for every moelab command line in ```bash blocks."""
    found = []
    for block in fenced_blocks(text):
        if block.lang not in ("bash", "sh", "console"):
            continue
        logical: list[tuple[int, str]] = []  # (first line number, continuation-joined text)
        pending: tuple[int, str] | None = None
        for offset, raw in enumerate(block.code.splitlines()):
            start, text = pending if pending is not None else (block.line + offset + 1, "")
            if raw.rstrip().endswith("\\"):
                pending = (start, text + raw.rstrip()[:-1] + " ")
                continue
            pending = None
            logical.append((start, text + raw))
        for start, line in logical:
            line = line.strip()
            if line.startswith("#"):
                continue
            line = line.split(" #", 1)[0]
            if line.startswith("$ "):
                line = line[2:]
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            for j, w in enumerate(words):
                if w == "moelab" or w.endswith("/moelab") or w == "moelab.cli":
                    found.append((start, words[j + 1 :]))
                    break
    return found


def check_invocation(root, argv: list[str]) -> list[str]:
    """Problems with one `moelab ...` argv: unknown command or unknown option."""
    cmd = root
    path = ["moelab"]
    rest = list(argv)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        if name not in cmd.commands:
            return [f"unknown command {' '.join(path + [name])!r}"]
        cmd = cmd.commands[name]
        path.append(name)
    if hasattr(cmd, "commands"):
        return [] if not rest or rest == ["--help"] else [f"{' '.join(path)} needs a subcommand"]
    known = _options(cmd)
    bad = []
    for w in rest:
        if w.startswith("--"):
            flag = w.split("=", 1)[0]
            if flag not in known:
                bad.append(f"{' '.join(path)}: unknown option {flag}")
    return bad


def test_check_invocation_catches_unknown_flags() -> None:
    root = _click_root()
    assert check_invocation(root, ["trace", "--model", "m", "--out", "o", "--logits"]) == []
    assert check_invocation(root, ["trace", "--model", "m", "--no-such-flag"]) == [
        "moelab trace: unknown option --no-such-flag"
    ]
    assert check_invocation(root, ["nonexistent"]) == ["unknown command 'moelab nonexistent'"]
    assert check_invocation(root, ["predict", "compare", "--train", "t", "--horizons=d=1"]) == []


@pytest.mark.parametrize("name", [*PAGES, "README_BODY.md"])
def test_doc_cli_lines_use_real_flags(name: str) -> None:
    path = README_BODY if name == "README_BODY.md" else GUIDE / name
    invocations = moelab_invocations(path.read_text())
    if name != "README_BODY.md":
        assert invocations, f"{name}: no `moelab ...` command line in a ```bash block"
    root = _click_root()
    problems = [
        f"{name} line {ln}: {msg}"
        for ln, argv in invocations
        for msg in check_invocation(root, argv)
    ]
    assert not problems, "\n".join(problems)


def test_readme_body_links_exist() -> None:
    text = README_BODY.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if target.startswith("http"):
            continue
        if target == "bench/RESULTS.md":  # written by the benchmark run (coordinator)
            continue
        assert (ROOT / target).exists(), f"README_BODY.md links to missing {target}"
    for page in PAGES:
        assert f"docs/guide/{page}" in text, f"README_BODY.md does not list docs/guide/{page}"
