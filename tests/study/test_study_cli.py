"""`peerlm study ...` flags checked where they enter: a budget must be a positive number of FLOPs (an
exponent with a minus sign included), the plan's table stays readable at any budget, and a mistyped
``--isoflop-results`` folder is named as missing."""

from __future__ import annotations

import math

import pytest

from peerlm.cli import main


@pytest.mark.parametrize("value", ["-2e12", "-1", "-.5", "0", "nan", "inf", "1e400", "x"])
def test_a_budget_must_be_a_positive_number_of_flops(tmp_path, capsys, value):
    assert main(["study", "isoflop", "--results", str(tmp_path / "r"), "--budget", value, "--plan"]) == 2
    err = capsys.readouterr().err
    assert err == (f"peerlm: error: argument --budget: a budget must be a positive number of FLOPs (e.g. 2e12), "
                   f"got {value!r} (see `peerlm study isoflop --help`)\n")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flops", ["1e30", "2e12", "3e10"])
def test_the_plan_table_keeps_its_columns_apart_at_any_budget(tmp_path, capsys, flops):
    assert main(["study", "isoflop", "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w"),
                 "--budget", flops, "--plan", "--no-calibrate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head, rows = lines[0], lines[1:-1]
    assert head.split() == ["phase", "run", "params", "tokens", "steps", "est.", "min"] and rows
    for row in rows:
        cells = row.split()
        assert len(cells) == 6, row
        phase, run_id, params, tokens, steps, est = cells
        assert params.endswith("M") and est == "-"
        assert int(tokens.replace(",", "")) > 0 and int(steps.replace(",", "")) > 0
        assert len(row) <= len(head)  # right-aligned under their headings
    budget = float(flops)
    assert all(math.isclose(float(r.split()[1].split("_")[0]), budget) for r in rows)


def test_a_mistyped_isoflop_results_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "reslts" / "isoflop"
    assert main(["study", "experts", "--isoflop-results", str(missing), "--results", str(tmp_path / "e"),
                 "--plan"]) == 2
    err = capsys.readouterr().err
    assert f"--isoflop-results {missing} does not exist" in err and "run the isoFLOP study first" not in err
    (tmp_path / "file").write_text("")
    assert main(["study", "experts", "--isoflop-results", str(tmp_path / "file"), "--results", str(tmp_path / "e"),
                 "--report"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
