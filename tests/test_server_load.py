"""A short hostile load on a real `ris serve` subprocess (benchmarks/search/load_test.py --hostile): no 5xx, bounded memory.

The long run (8 clients, 30 s) and its figures are in benchmarks/RESULTS.md; here 4 clients for a few seconds
check the properties, never timings. Before the pixel budget, each 13000 x 13000 PNG bomb took ~1.8 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_fixtures import build_collection

ROOT = Path(__file__).resolve().parents[1]
#: Growth over the idle server's RSS that the hostile mix may cause (one decode within the pixel budget is
#: ~160 MB in Pillow's RGBX layout, two decode at once; a bomb decoded would be ~700 MB to 1.8 GB).
RSS_GROWTH_MB = 700


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc (Linux)")
def test_hostile_mix_gets_no_5xx_and_bounded_memory(tmp_path: Path) -> None:
    collection = build_collection(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/search/load_test.py"), "--hostile", "--seconds", "5", "--concurrency", "4",
         "--collection", str(collection), "--json"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["server_errors"] == 0, report["error_samples"]
    assert not [key for key in report["outcomes"] if "closed" in key], report["outcomes"]
    assert report["valid_answered"] >= 1, report["outcomes"]
    assert {key.split()[0] for key in report["outcomes"]} >= {"valid", "bomb-13k"}, report["outcomes"]
    assert report["rss_peak_mb"] - report["rss_idle_mb"] < RSS_GROWTH_MB, report
