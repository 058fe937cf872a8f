"""Sweeps: grid parsing, per-group power-law fits, and a small end-to-end grid that resumes."""

import dataclasses
import json

import pytest

from engramlab import EngramError
from engramlab.train.sweep import fit_groups, parse_grid, run_sweep
from engramlab.train.trainer import TrainConfig


def test_parse_grid():
    grid = parse_grid(["n_people=250,500", "sampler=uniform|celebrities:k=10,w=8", "lr=0.003"])
    assert grid == {"n_people": [250, 500], "sampler": ["uniform", "celebrities:k=10,w=8"], "lr": [0.003]}
    with pytest.raises(EngramError, match="unknown key 'people'"):
        parse_grid(["people=3"])
    with pytest.raises(EngramError, match="KEY=V1,V2"):
        parse_grid(["n_people"])


def test_fit_groups_fits_each_sampler_separately():
    rows = []
    for sampler, a in (("uniform", 0.5), ("powerlaw:alpha=0.7", 0.2)):
        for n in (100, 200, 400, 800):
            rows.append({"n_people": n, "sampler": sampler, "seed": 0, "summary.plateau_end_step": a * n**0.8})
    fits = fit_groups(rows, ["n_people", "sampler", "seed"])
    assert set(fits) == {"sampler=uniform", "sampler=powerlaw:alpha=0.7"}
    assert fits["sampler=uniform"]["b"] == pytest.approx(0.8) and fits["sampler=uniform"]["a"] == pytest.approx(0.5)
    assert fits["sampler=powerlaw:alpha=0.7"]["a"] == pytest.approx(0.2)


def test_small_sweep_end_to_end_and_resume(tmp_path):
    base = TrainConfig(steps=4, batch_size=4, eval_every=2, eval_people=4, eval_templates=1, checkpoints="none")
    grid = {"n_people": [20, 30]}
    summary = run_sweep(tmp_path, grid, base=base, show_progress=False, log=lambda *_: None)
    rows = [json.loads(l) for l in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [r["n_people"] for r in rows] == [20, 30] and summary["n_runs"] == 2
    assert all("summary.final_attr_loss" in r for r in rows)
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "fit.json").exists()
    # A second call finds both runs finished and trains nothing.
    ran = []
    run_sweep(tmp_path, grid, base=base, show_progress=False, log=ran.append)
    assert ran == []


def test_a_sweep_rerun_with_other_settings_does_not_report_old_results(tmp_path):
    base = TrainConfig(steps=4, batch_size=4, eval_every=2, eval_people=4, eval_templates=1, checkpoints="none",
                       lr=1e-3)
    grid = {"n_people": [20]}
    run_sweep(tmp_path, grid, base=base, show_progress=False, log=lambda *_: None)
    first = json.loads((tmp_path / "sweep.jsonl").read_text().splitlines()[0])
    ran = []
    changed = dataclasses.replace(base, lr=1e-2)
    run_sweep(tmp_path, grid, base=changed, show_progress=False, log=ran.append)
    assert any("lr: 0.001 -> 0.01" in line for line in ran)  # it says why it trains again
    again = json.loads((tmp_path / "sweep.jsonl").read_text().splitlines()[0])
    manifest = json.loads((tmp_path / again["run"] / "manifest.json").read_text())
    assert manifest["config"]["lr"] == 0.01 and manifest["status"] == "complete"
    assert again["summary.final_attr_loss"] != first["summary.final_attr_loss"]
    # A bad value anywhere in the grid is refused before the first run trains.
    with pytest.raises(EngramError, match=r"TrainConfig.eval_every=0 \(--eval-every\)"):
        run_sweep(tmp_path / "bad", {"n_people": [20], "eval_every": [2, 0]}, base=base, show_progress=False,
                  log=lambda *_: None)
    assert not (tmp_path / "bad" / "runs").exists()
