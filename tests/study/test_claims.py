"""Run claims: one process per run, so that several can work through one study's plan."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from test_isoflop import write

from peerlm.study import isoflop_study
from peerlm.study.claims import RunClaimed, claim


@pytest.fixture
def hold(tmp_path):
    """Start another process that holds claims on the given paths until the test ends."""
    procs = []

    def start(*paths):
        code = textwrap.dedent(f"""
            import contextlib, sys, time
            from pathlib import Path
            from peerlm.study.claims import claim
            with contextlib.ExitStack() as stack:
                for p in {[str(p) for p in paths]!r}:
                    stack.enter_context(claim(Path(p), "held"))
                print("held", flush=True)
                time.sleep(120)
            """)
        env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_claim_is_held_for_the_block_nested_use_included(tmp_path):
    path = tmp_path / "claims" / "r.claim"
    with claim(path, "r"):
        assert path.exists()
        with claim(path, "r"):  # the same process again: it keeps its claim
            pass
        assert path.exists()
    assert not path.exists()


def test_a_held_claim_is_refused_and_freed_when_its_process_dies(tmp_path, hold):
    path = tmp_path / "claims" / "r.claim"
    p = hold(path)
    with pytest.raises(RunClaimed, match=f"r is being run by pid {p.pid} on .*, for 0 min"):
        with claim(path, "r"):
            raise AssertionError("must not run")
    p.kill()  # no clean-up: the kernel drops the lock with the process
    p.wait()
    with claim(path, "r"):
        assert path.exists()


def test_the_driver_skips_a_run_another_process_holds(tmp_path, hold):
    logs = []
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", log=logs.append)
    first, second = study.pending()[:2]
    p = hold(tmp_path / "claims" / f"{first.run_id}.claim")
    ran = []
    study._run_one = lambda spec, progress: ran.append(spec.run_id) or write(study, spec, 3.0)
    assert study.run(max_runs=1) == 1
    assert ran == [second.run_id] and any("skipped" in s and first.run_id in s for s in logs)
    with pytest.raises(RunClaimed):
        study.run_one(first)
    write(study, first, 3.0)  # the holder records it and ends; a caller that comes after gets that record
    p.kill()
    p.wait()
    assert study.run_one(first)["run_id"] == first.run_id and ran == [second.run_id]


def test_the_driver_stops_when_every_pending_run_is_held(tmp_path, hold):
    logs = []
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(2e12,), methods=("dense",),
                          log=logs.append)
    hold(*(tmp_path / "claims" / f"{s.run_id}.claim" for s in study.pending()))
    study._run_one = lambda spec, progress: pytest.fail("a held run was trained")
    assert study.run() == 0
    assert logs[-1] == "study: every pending run is being run by another process"


def test_a_run_recorded_meanwhile_is_not_counted_or_trained(tmp_path):
    logs = []
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(2e12,), methods=("dense",),
                          log=logs.append)
    first = study.pending()[0]
    real_records = study.records
    study.records = lambda: real_records() | {first.run_id: {"run_id": first.run_id}}  # recorded as claimed
    plans = iter([[first], []])  # the next look at the plan finds the record
    study.pending = lambda: next(plans)
    study._run_one = lambda spec, progress: pytest.fail("a recorded run was trained")
    assert study.run(max_runs=1) == 0
    assert any("not run again" in s for s in logs)
