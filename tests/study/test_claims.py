"""Run claims: one process per run, so that several can work through one study's plan."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from test_isoflop import write

from peerlm.study import Study
from peerlm.study.claims import RunClaimed, claim


def _write_claim(path, pid, host=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": 0}))


@pytest.fixture
def other_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def test_a_claim_is_held_for_the_block_and_removed_after(tmp_path):
    path = tmp_path / "claims" / "r.json"
    with claim(path, "r"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with claim(path, "r"):  # the same process again: its own claim
            pass
    assert not path.exists() and list(tmp_path.joinpath("claims").iterdir()) == []


def test_a_live_claim_is_refused_a_dead_one_taken_over(tmp_path, other_process):
    path = tmp_path / "claims" / "r.json"
    _write_claim(path, other_process)
    with pytest.raises(RunClaimed, match=f"r is being run by pid {other_process}"):
        with claim(path, "r"):
            raise AssertionError("must not run")
    assert json.loads(path.read_text())["pid"] == other_process  # the holder's claim is left alone
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_claim(path, int(done.stdout))  # that process has exited: the claim is stale
    with claim(path, "r"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    _write_claim(path, os.getpid(), host="another-host")  # a process this host cannot see
    with pytest.raises(RunClaimed, match="another-host"):
        with claim(path, "r"):
            pass


def test_the_driver_skips_a_run_another_process_holds(tmp_path, other_process):
    logs = []
    study = Study(tmp_path / "res", work=tmp_path / "work", log=logs.append)
    first, second = study.pending()[:2]
    _write_claim(study.work / "claims" / f"{first.run_id}.json", other_process)
    ran = []
    study._run_one = lambda spec, progress: ran.append(spec.run_id) or write(study, spec, 3.0)
    assert study.run(max_runs=1) == 1
    assert ran == [second.run_id] and any("skipped" in s and first.run_id in s for s in logs)
    with pytest.raises(RunClaimed):
        study.run_one(first)
    write(study, first, 3.0)  # the holder records it; a caller that waited gets that record
    (study.work / "claims" / f"{first.run_id}.json").unlink()
    assert study.run_one(first)["run_id"] == first.run_id and ran == [second.run_id]


def test_the_driver_stops_when_every_pending_run_is_held(tmp_path, other_process):
    logs = []
    study = Study(tmp_path / "res", work=tmp_path / "work", budgets=(2e12,), methods=("dense",), log=logs.append)
    for spec in study.pending():
        _write_claim(study.work / "claims" / f"{spec.run_id}.json", other_process)
    study._run_one = lambda spec, progress: pytest.fail("a held run was trained")
    assert study.run() == 0
    assert logs[-1] == "study: every pending run is being run by another process"
