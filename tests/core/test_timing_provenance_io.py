"""RatioSummary verdicts, provenance of reports, and normal modes of atomically written files."""

from __future__ import annotations

import os
import subprocess

import pytest

import moelab
from moelab._io import atomic_write_json, atomic_write_with, default_mode
from moelab.errors import InputError
from moelab.provenance import provenance, source_commit
from moelab.timing import RatioSummary


def test_ratio_summary_verdicts():
    slower = RatioSummary((0.61, 0.65, 0.70))
    assert (slower.median, slower.low, slower.high) == (0.65, 0.61, 0.70)
    assert slower.verdict == "slower"
    assert slower.text() == "0.65x (0.61-0.70 over 3 repeats): slower"
    assert RatioSummary((0.95, 1.02, 1.1)).verdict == "no measurable difference"
    assert RatioSummary((1.2, 1.3, 1.5)).verdict == "faster"
    noise = RatioSummary((1.4, 1.49, 1.6), cannot_exceed_one=True)
    assert noise.verdict == "measurement noise: cannot be faster than the reference"
    d = noise.to_dict()
    assert d["ratios"] == [1.4, 1.49, 1.6] and d["median"] == 1.49 and d["repeats"] == 3
    assert d["text"].endswith("measurement noise: cannot be faster than the reference")
    for bad in ((), (0.0,), (float("nan"), 1.0)):
        with pytest.raises(InputError, match="RatioSummary"):
            RatioSummary(bad)


def test_provenance_names_version_and_commit():
    p = provenance()
    assert p["moelab_version"] == moelab.__version__ and p["torch"] and p["python"]
    here = os.path.dirname(moelab.__file__)
    git = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True)  # fmt: skip
    if git.returncode == 0:  # a checkout: the commit (maybe +dirty) is the checkout's HEAD
        assert source_commit().split("+")[0] == git.stdout.strip()
    else:
        assert source_commit() is None


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_with(tmp_path / "b.bin", lambda p: p.write_bytes(b"x"))
        assert default_mode() == 0o666 & ~umask
        assert default_mode(directory=True) == 0o777 & ~umask
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
