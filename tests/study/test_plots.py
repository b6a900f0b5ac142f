"""`peerlm study ...` without matplotlib (the ``study`` extra): the tables and JSON, then one line that
says how to get the plots, instead of a traceback."""

from __future__ import annotations

import sys

import pytest
from test_ablations import iso  # noqa: F401 (a fixture)
from test_isoflop import B0, finish_pending

from peerlm.cli import main
from peerlm.study import isoflop_study
from peerlm.study.design import SIZES

NAMES = [s.name for s in SIZES]


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


def done_study(tmp_path):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "w", budgets=(B0,), methods=("dense",),
                          log=lambda s: None)
    finish_pending(study, lambda s: 3.0 + 0.05 * (NAMES.index(s.size) - 3) ** 2)
    return study


@pytest.mark.parametrize("flags", [["--report"], [], ["--time-steps"]])
def test_reports_without_matplotlib_are_tables_and_a_line(tmp_path, capsys, monkeypatch, no_matplotlib, flags):
    import peerlm.study.runner as runner

    monkeypatch.setattr(runner, "time_models", lambda models, steps, device: {k: 1e-3 for k, _, _ in models})
    study = done_study(tmp_path)  # every run recorded: the plain command ends by writing the reports
    assert main(["study", "isoflop", "--results", str(study.results), "--work", str(tmp_path / "w"),
                 "--budget", "2e12", "--method", "dense", *flags]) == 0
    out, err = capsys.readouterr()
    assert f"wrote {study.results / 'table.md'}" in out and f"wrote {study.results / 'summary.json'}" in out
    assert out.count('pip install "peerlm[study]"') == 1 and "Traceback" not in out + err and err == ""
    assert not list(study.results.glob("*.png"))
    assert ("timing.json" in out) == (flags == ["--time-steps"])


def test_an_ablation_report_without_matplotlib(iso, tmp_path, capsys, no_matplotlib):  # noqa: F811
    from peerlm.study.ablations import ablation_study

    ab = ablation_study("experts", tmp_path / "experts", iso)
    finish_pending(ab, lambda s: 3.0 + 0.01 * s.seed)
    assert main(["study", "experts", "--results", str(ab.results), "--isoflop-results", str(iso.results),
                 "--work", str(iso.work), "--report"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {ab.results / 'table.md'}" in out and 'pip install "peerlm[study]"' in out
    assert not (ab.results / "experts.png").exists()
