"""Sweeps: grid parsing, per-group power-law fits, and a small end-to-end grid that resumes."""

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
