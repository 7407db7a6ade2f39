"""Render a report page in headless Chromium and report console errors, the rendered DOM and a
screenshot (used by tests and by `moelab demo` to check that report.html really works offline).

An error recorder (window.onerror, unhandled rejections, console.error) is injected at the top
of a temporary copy of the page; after load Chromium dumps the DOM with the recorded errors and
takes a screenshot in the same run. Chromium's own stderr CONSOLE lines are scanned as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import InputError

_RECORDER = """<script>window.__moelabErrors=[];
window.addEventListener('error',function(e){window.__moelabErrors.push('error: '+(e.message||e.type))},true);
window.addEventListener('unhandledrejection',function(e){window.__moelabErrors.push('rejection: '+e.reason)});
(function(){var ce=console.error;console.error=function(){window.__moelabErrors.push('console.error: '+
Array.prototype.join.call(arguments,' '));ce.apply(console,arguments)}})();
window.addEventListener('load',function(){setTimeout(function(){var p=document.createElement('pre');
p.id='moelab-js-errors';p.textContent=JSON.stringify(window.__moelabErrors);document.body.appendChild(p)},500)});
</script>"""

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--hide-scrollbars",
]


@dataclass
class PageCheck:
    """What Chromium saw when it rendered a page."""

    errors: list[str]  # JS errors recorded in the page and error CONSOLE lines from stderr
    dom: str  # the DOM after load and scripts ran
    screenshot: Path  # PNG of the top of the page
    nonblank_fraction: float  # share of screenshot pixels that are not (near-)white
    console: list[str] = field(default_factory=list)  # every CONSOLE line (any level)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def check_page(
    html_path: str | os.PathLike[str], timeout: float = 120.0, width: int = 1280, height: int = 2400
) -> PageCheck:
    """Render `html_path` in headless Chromium; return errors, DOM and a screenshot check."""
    exe = find_chromium()
    if exe is None:
        raise InputError("check_page: no Chromium binary found (install Debian package `chromium`)")
    src = Path(html_path)
    if not src.is_file():
        raise InputError(f"check_page: {src} does not exist")
    work = Path(tempfile.mkdtemp(prefix="moelab-chromium-"))
    page = work / "page.html"
    text = src.read_text(encoding="utf-8")
    m = re.search(r"<head[^>]*>", text, flags=re.I)
    text = text[: m.end()] + _RECORDER + text[m.end() :] if m else _RECORDER + text
    page.write_text(text, encoding="utf-8")
    shot = work / "screenshot.png"
    cmd = [
        exe,
        *_FLAGS,
        f"--user-data-dir={work / 'profile'}",
        f"--window-size={width},{height}",
        "--virtual-time-budget=5000",
        f"--screenshot={shot}",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    dom = proc.stdout
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    errors: list[str] = []
    m2 = re.search(r'<pre id="moelab-js-errors">(.*?)</pre>', dom, flags=re.S)
    if m2 is None:
        errors.append("error recorder did not report (page did not finish loading)")
    else:
        import html as _html

        errors.extend(json.loads(_html.unescape(m2.group(1))))
    errors.extend(ln for ln in console if re.search(r"Uncaught|Error", ln))
    frac = 0.0
    if shot.is_file():
        import matplotlib.image as mpimg

        img = mpimg.imread(str(shot))[..., :3]
        frac = float((img.mean(axis=-1) < 0.95).mean())
    return PageCheck(errors, dom, shot, frac, console)
