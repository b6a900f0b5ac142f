"""``scripts/gpu_check.sh --smoke``: the script a lent GPU runs once (15 minutes in all) runs every step
on the CPU with tiny sizes and exits 0, so a mistake in it is found here and not on the device. Marked
``triton``: its benchmark step runs the kernels in Triton's interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_every_step(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    before = sorted((ROOT / ".gpu").rglob("*"))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (tmp_path / "device.txt").read_text()
    assert proc.returncode == 0, log + proc.stdout[-2000:] + proc.stderr[-2000:]
    for step in ("gpu tests", "triton benchmark", "decode"):
        assert f"{step}: exit 0" in log
    assert "failed steps: 0" in log
    assert json.loads((tmp_path / "triton.json").read_text())["results"], "the Triton benchmark wrote no figures"
    assert "| tokens/s |" in (tmp_path / "decode.txt").read_text()
    prepared = (ROOT / ".gpu" / "study" / "data-v1024" / "meta.json").is_file()
    if prepared:  # the isoflop step re-trains three records, 3 steps each
        assert "isoflop: exit 0" in log
        rows = json.loads((tmp_path / "isoflop.json").read_text())
        assert [r["tokens"] for r in rows] == [3 * 16 * 128] * 3
        assert all("cpu tag" in r["again"]["machine"] for r in rows)
        assert sorted((ROOT / ".gpu").rglob("*")) == before  # the smoke run wrote nothing under .gpu
    else:
        assert "isoflop: skipped" in log
