"""``project --steps-ratio-from``: the K-FAC/Adam steps ratio measured by ``compare`` replaces the
assumed one in the paper scenario (issue 21, item 7)."""

from __future__ import annotations

import json

import pytest

from thermo_kfac import cli
from thermo_kfac.experiments.project_report import measured_steps_ratio


def _results(path, thermo_steps, adam_steps):
    runs = [{"label": "adam", "steps_to_target": adam_steps},
            {"label": "kfac", "steps_to_target": 7},
            {"label": "kfac:solver=thermo", "steps_to_target": thermo_steps}]
    path.write_text(json.dumps({"target_loss": 0.01, "runs": runs}))
    return path


def test_measured_ratio_is_thermo_over_adam_steps(tmp_path):
    ratio, source = measured_steps_ratio(str(_results(tmp_path / "r.json", 30, 120)))
    assert ratio == pytest.approx(0.25) and "kfac:solver=thermo 30 vs adam 120" in source


def test_paper_report_uses_and_shows_the_measured_ratio(tmp_path, capsys):
    results = _results(tmp_path / "r.json", 30, 120)
    out = tmp_path / "p.json"
    assert cli.main(["project", "--scenario", "paper", "--model", "vit-b16", "--steps-ratio-from",
                     str(results), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["steps_ratio"] == pytest.approx(0.25)
    assert report["steps_ratio_measured"] == pytest.approx(0.25) and report["steps_ratio_assumed"] == 0.6
    assert "steps ratio measured 0.25" in capsys.readouterr().out


def test_a_run_that_missed_the_target_is_refused(tmp_path):
    with pytest.raises(ValueError, match="did not reach the target"):
        measured_steps_ratio(str(_results(tmp_path / "r.json", None, 120)))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a compare results.json"):
        measured_steps_ratio(str(tmp_path / "bad.json"))
