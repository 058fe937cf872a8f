"""``--executor ray``: the same run directory as the local executor, a killed worker retried, and
the bad inputs (Ray missing, an address nothing answers at) refused before anything is written.

The Ray cluster is a local one this module starts with 2 CPUs; the module is skipped where Ray is
not installed (``pip install 'engramlab[ray]'``; ``make test`` installs it)."""

import json
import os
import signal
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from engramlab.cli import app

ray = pytest.importorskip("ray")

# recall and knowledge neurons at every checkpoint: 2 x 4 units of a few seconds each.
EVOLVE = ["--analysis", "recall,neurons", "--set", "neurons.steps=4", "--set", "neurons.max_rank=1000000"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_evolve(trained):
    """The local executor's run, on one thread like each Ray task (thread counts change float sums)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(trained / "local"),
                                     *EVOLVE])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    return trained / "local"


def _untimed(path):
    return {k: v for k, v in json.loads(path.read_text()).items() if "seconds" not in k}


def _same_results(a, b):
    assert (a / "evolution.jsonl").read_text() == (b / "evolution.jsonl").read_text()
    assert _untimed(a / "summary.json") == _untimed(b / "summary.json")
    assert (a / "skipped.jsonl").read_text() == (b / "skipped.jsonl").read_text()
    steps = sorted(p.name for p in a.glob("step-*"))
    assert steps and steps == sorted(p.name for p in b.glob("step-*"))
    for step in steps:
        for name in ("recall", "neurons"):
            assert (a / step / name / "records.jsonl").read_text() == (b / step / name / "records.jsonl").read_text()


def test_ray_evolve_gives_the_local_run_directory(cluster, trained, local_evolve, tmp_path):
    out = tmp_path / "ray"
    r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(out), *EVOLVE,
                                 "--executor", "ray"])
    assert r.exit_code == 0, r.output
    _same_results(out, local_evolve)
    marks = sorted((out / ".units").iterdir())
    assert len(marks) == 8  # 4 checkpoints x 2 analyses, each a task of its own
    pids = set()
    for m in marks:
        lines = m.read_text().split("\n")[:-1]
        assert [line.split()[0] for line in lines] == ["start", "done"]
        pids.add(int(lines[0].split()[1]))
    assert os.getpid() not in pids  # they ran in Ray's workers, not here


def test_a_worker_killed_mid_sweep_is_retried(cluster, trained, local_evolve, tmp_path):
    out = tmp_path / "killed"
    result = {}

    def run():
        result["r"] = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(out), *EVOLVE,
                                               "--executor", "ray", "--retries", "2"])

    thread = threading.Thread(target=run)
    thread.start()
    victim, deadline = None, time.time() + 240
    while victim is None and thread.is_alive() and time.time() < deadline:
        for mark in sorted((out / ".units").glob("*neurons")) if (out / ".units").is_dir() else []:
            lines = mark.read_text().split("\n")[:-1]
            if lines == [lines[0]] and lines[0].startswith("start"):  # started, not finished
                victim = (mark, int(lines[0].split()[1]))
                os.kill(victim[1], signal.SIGKILL)
                break
        time.sleep(0.01)
    thread.join(timeout=300)
    assert victim is not None, "no unit could be caught running"
    assert result["r"].exit_code == 0, result["r"].output
    starts = [line for line in victim[0].read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 2 and int(starts[1].split()[1]) != victim[1]  # run again, in another worker
    assert victim[0].read_text().splitlines()[-1].startswith("done")
    _same_results(out, local_evolve)  # the run directory is complete and as the local one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nothing_answers_at_is_refused_at_once(trained, tmp_path):
    out = tmp_path / "nowhere"
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(out), "--executor", "ray",
                                 "--ray-address", f"127.0.0.1:{_free_port()}"])
    assert r.exit_code == 2 and "nothing answers there" in r.output and "ray start --head" in r.output
    assert time.monotonic() - t0 < 30
    assert not out.exists()  # nothing written
    r = CliRunner().invoke(app, ["sweep", "--out", str(out), "--grid", "n_people=20", "--executor", "ray",
                                 "--ray-address", "no-port-here"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output and not out.exists()


def test_ray_missing_names_the_extra(trained, tmp_path, monkeypatch):
    import engramlab.scale.executor as executor

    monkeypatch.setattr(executor, "ray_available", lambda: False)
    out = tmp_path / "noray"
    r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(out), "--executor", "ray"])
    assert r.exit_code == 2 and "pip install 'engramlab[ray]'" in r.output and not out.exists()
    r = CliRunner().invoke(app, ["evolve", "--run", str(trained / "run"), "--out", str(out), "--ray-address",
                                 "127.0.0.1:6379"])
    assert r.exit_code == 2 and "--executor ray" in r.output and not out.exists()


def test_ray_sweep_gives_the_local_runs(cluster, tmp_path):
    import torch

    grid = ["--grid", "n_people=12,16", "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-people",
            "4", "--eval-templates", "1", "--full-runs"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "local"), *grid])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "ray"), *grid, "--executor", "ray"])
    assert r.exit_code == 0, r.output
    strip = lambda rows: [{k: v for k, v in row.items() if "seconds" not in k and "per_second" not in k}  # noqa: E731
                          for row in rows]
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    assert strip(read(tmp_path / "ray" / "sweep.jsonl")) == strip(read(tmp_path / "local" / "sweep.jsonl"))
    for run in ("n_people-12", "n_people-16"):
        a = (tmp_path / "ray" / "runs" / run / "metrics.jsonl").read_text().splitlines()
        b = (tmp_path / "local" / "runs" / run / "metrics.jsonl").read_text().splitlines()
        assert [strip([json.loads(x)]) for x in a] == [strip([json.loads(x)]) for x in b]
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["n_failed"] == 0


def test_stage_dependencies_are_the_directories_a_command_names():
    from engramlab.studies.stages import depends_on
    from engramlab.studies.study import PRESET_FILE, load_presets

    stages = {s.name: (i, s) for i, s in enumerate(load_presets(PRESET_FILE)["demo"]["stages"])}
    every = [s for _, s in sorted(stages.values(), key=lambda t: t[0])]

    def deps(name):
        i, s = stages[name]
        return set(depends_on(s, every[:i]))

    assert deps("world") == set() and deps("recall-smollm2") == set()
    assert deps("finetune") == {"world-new", "train"}
    assert deps("patched") == {"world", "train"}  # --patch-attention-from {root}/train:600
    assert deps("regions-smollm2") == {"corpus", "corpus-en", "corpus-py"}
    assert deps("freeze-smollm2") == {"regions-smollm2"}
    assert deps("evolve-b") == {"train-b"}


STUDY = """
[micro]
description = "two worlds, a run on each, one stage that fails"
stages = [
  { name = "w1", command = "world --preset tiny --n-people 12 --n-heldout 4" },
  { name = "w2", command = "world --preset tiny --n-people 16 --n-heldout 4" },
  { name = "t1", command = "train --world {root}/w1 --model-config tiny --steps 4 --batch-size 4 --eval-every 2 --eval-people 4 --eval-templates 1 --checkpoints none" },
  { name = "bad", command = "train --world {root}/w2 --model-config no-such-config --steps 4" },
  { name = "after-bad", command = "train --world {root}/bad --steps 4" },
  { name = "t2", command = "train --world {root}/w2 --model-config tiny --steps 4 --batch-size 4 --eval-every 2 --eval-people 4 --eval-templates 1 --checkpoints none" },
]
"""


def test_ray_study_runs_independent_stages_and_stops_only_what_a_failure_blocks(cluster, tmp_path):
    study = tmp_path / "study.toml"
    study.write_text(STUDY)
    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["study", "--config", str(study), "--preset", "micro", "--out", str(out), "--quiet",
                                 "--executor", "ray", "--retries", "0"])
    assert r.exit_code == 2
    assert "bad" in r.output and "after-bad (not run: bad failed)" in r.output
    for name in ("w1", "w2", "t1", "t2"):  # everything the failure does not block finished
        assert json.loads((out / name / "manifest.json").read_text())["status"] == "complete", name
    assert not (out / "after-bad").exists()

    def times(name):
        return {line.split()[0]: float(line.split()[3]) for line in (out / ".units" / name).read_text().splitlines()}

    assert times("t1")["start"] >= times("w1")["done"] and times("t2")["start"] >= times("w2")["done"]
    assert "refused" in times("bad")  # a failing command is reported once, not retried
    # The same stages run locally give the same trained models.
    local = tmp_path / "local"
    r = CliRunner().invoke(app, ["study", "--config", str(study), "--preset", "micro", "--out", str(local), "--quiet"])
    assert r.exit_code == 2 and "bad" in r.output
    last = lambda d: {k: v for k, v in json.loads((d / "t1" / "metrics.jsonl").read_text().splitlines()[-1]).items()  # noqa: E731
                      if "seconds" not in k and "per_second" not in k}
    assert last(local) == last(out) and "eval.attr_loss" in last(out)
