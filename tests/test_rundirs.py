"""Run directories belong to one run: lock, ownership, resume, signals, leftovers, permissions."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from engramlab import EngramError
from engramlab import runs
from engramlab.cli import app
from engramlab.runs import RunDir, atomic_directory, atomic_write_text, read_jsonl, run_is_live

ENGRAM = [sys.executable, "-c", "from engramlab.cli import main; main()"]


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def finished(path, command="recall", summary=None):
    with RunDir(path, command, {"x": 1}) as run:
        run.write_json("artifact.json", {"a": 1})
        run.finish(summary or {"top1_accuracy": 0.5})


def test_second_process_on_the_same_out_is_refused_and_names_the_holder(tmp_path):
    with RunDir(tmp_path / "r", "recall", {}) as run:
        with pytest.raises(EngramError, match=rf"in use by another engram run \(pid {os.getpid()} on host"):
            with RunDir(tmp_path / "r", "recall", {}):
                pass
        m = manifest(run.path)
        assert m["status"] == "running" and m["pid"] == os.getpid() and m["host"]
        assert run_is_live(m, run.path)
    m = manifest(tmp_path / "r")
    assert m["status"] == "complete" and not run_is_live(m, tmp_path / "r")


def test_a_dead_running_run_is_not_live(tmp_path):
    path = tmp_path / "r"
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"command": "train", "status": "running", "pid": 1}))
    (path / ".lock").write_text("pid 1 on host gone\n")
    assert not run_is_live(manifest(path), path)  # nobody holds the lock


def test_refuses_another_commands_run_and_a_complete_run(tmp_path):
    finished(tmp_path / "r", "train")
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with pytest.raises(EngramError, match="holds a run of `engram train`, not recall.*--overwrite"):
        with RunDir(tmp_path / "r", "recall", {}):
            pass
    with pytest.raises(EngramError, match="holds a complete train run.*--overwrite"):
        with RunDir(tmp_path / "r", "train", {}):
            pass
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    assert after == before  # nothing was damaged


def test_overwrite_clears_and_resume_of_a_complete_run_keeps_it(tmp_path):
    finished(tmp_path / "r", "train", {"final_attr_acc": 0.9})
    summary = (tmp_path / "r" / "summary.json").read_bytes()
    with RunDir(tmp_path / "r", "train", {}, mode="resume") as run:
        assert run.already_complete and run.summary["final_attr_acc"] == 0.9
    assert (tmp_path / "r" / "summary.json").read_bytes() == summary
    assert manifest(tmp_path / "r")["status"] == "complete"
    with RunDir(tmp_path / "r", "recall", {}, mode="overwrite") as run:
        assert not (run.path / "artifact.json").exists() and not (run.path / "summary.json").exists()
        run.finish({"n": 1})
    assert manifest(tmp_path / "r")["command"] == "recall"


def test_a_fresh_run_clears_an_unfinished_one_but_not_its_checkpoints(tmp_path):
    path = tmp_path / "r"
    with pytest.raises(RuntimeError):
        with RunDir(path, "train", {}) as run:
            run.write_json("metrics.jsonl", {})
            raise RuntimeError("crash")
    assert manifest(path)["status"] == "failed" and manifest(path)["error"] == "crash"
    with RunDir(path, "train", {}) as run:
        assert not (path / "metrics.jsonl").exists()  # the failed run's files are gone
        (path / "checkpoints" / "step-0000010").mkdir(parents=True)
        raise_ = KeyboardInterrupt
        try:
            with RunDir(tmp_path / "other", "train", {}):
                raise raise_
        except KeyboardInterrupt:
            pass
    assert manifest(tmp_path / "other")["status"] == "interrupted"
    # An unfinished run with checkpoints is worth keeping: refused unless --resume / --overwrite.
    (path / "manifest.json").write_text(json.dumps({"command": "train", "status": "interrupted"}))
    with pytest.raises(EngramError, match="unfinished train run with checkpoints.*--resume.*--overwrite"):
        with RunDir(path, "train", {}):
            pass
    assert (path / "checkpoints" / "step-0000010").is_dir()
    with pytest.raises(EngramError, match="no run to resume"):
        with RunDir(tmp_path / "empty", "train", {}, mode="resume"):
            pass


def test_files_that_are_no_run_are_never_cleared(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for mode in ("new", "overwrite"):
        with pytest.raises(EngramError, match="holds files but no engram run"):
            with RunDir(tmp_path, "recall", {}, mode=mode):
                pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_orphan_temporaries_are_removed_on_start(tmp_path):
    path = tmp_path / "r"
    (path / "checkpoints" / ".step-0000100.abc123.tmp").mkdir(parents=True)
    (path / ".summary.json.xyz.tmp").write_text("half")
    (path / "checkpoints" / "step-0000050").mkdir()
    (path / "sub" ).mkdir()
    (path / "sub" / "manifest.json").write_text("{}")  # a run of its own: not ours to clean
    (path / "sub" / ".x.tmp").write_text("theirs")
    (path / "manifest.json").write_text(json.dumps({"command": "train", "status": "interrupted"}))
    with RunDir(path, "train", {}, mode="resume"):
        assert not (path / "checkpoints" / ".step-0000100.abc123.tmp").exists()
        assert not (path / ".summary.json.xyz.tmp").exists()
        assert (path / "checkpoints" / "step-0000050").is_dir() and (path / "sub" / ".x.tmp").exists()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_and_directories_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_directory(tmp_path / "d") as d:
            (d / "inner").write_text("y")
        with RunDir(tmp_path / "run", "recall", {}) as run:
            run.finish({})
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "run" / "summary.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_heartbeat_is_refreshed_while_running(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(runs, "_now", lambda: f"{time.monotonic():.6f}")
    with RunDir(tmp_path / "r", "recall", {}) as run:
        first = manifest(run.path)["heartbeat"]
        deadline = time.time() + 10
        while manifest(run.path)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert manifest(run.path)["heartbeat"] != first and manifest(run.path)["status"] == "running"
    assert manifest(tmp_path / "r")["status"] == "complete"  # a late beat never reopens the run


def test_filesystem_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EngramError, match="cannot create the directory .*choose a writable path"):
        with RunDir(tmp_path / "afile" / "sub", "recall", {}):
            pass

    # A full disk during the run: the error that ended the run is printed first.
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(EngramError) as caught:
        with RunDir(tmp_path / "r", "recall", {}) as run:
            monkeypatch.setattr(runs.os, "fsync", full)
            run.write_json("facts.json", {"a": 1})
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'r' / 'facts.json'}: cannot write (No space left on device)")
    assert "manifest.json" in message and "\n" not in message


def test_cli_refuses_to_replace_a_complete_run_unless_overwrite(tmp_path):
    runner = CliRunner()
    w = tmp_path / "world"
    assert runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "20", "--out", str(w)]).exit_code == 0
    people = (w / "people.jsonl").read_bytes()
    r = runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "30", "--out", str(w)])
    assert r.exit_code == 2 and "complete world run" in r.output and "--overwrite" in r.output
    assert (w / "people.jsonl").read_bytes() == people
    r = runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "30", "--out", str(w), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((w / "summary.json").read_text())["n_people"] == 30


TRAIN = ["--model-config", "tiny", "--steps", "{steps}", "--batch-size", "8", "--eval-every", "10",
         "--eval-people", "5", "--eval-templates", "1", "--checkpoints", "every:10", "--lr", "3e-3"]


def train_args(world, out, steps):
    return ["train", "--world", str(world), "--out", str(out), *[a.format(steps=steps) for a in TRAIN]]


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    w = tmp_path_factory.mktemp("w") / "world"
    r = CliRunner().invoke(app, ["world", "--preset", "tiny", "--n-people", "40", "--out", str(w)])
    assert r.exit_code == 0, r.output
    return w


def test_two_concurrent_trains_on_one_out(tmp_path, small_world):
    out = tmp_path / "run"
    # The first run is far too long to end by itself while the second starts (no race on timing);
    # it is stopped with SIGTERM once the second has been refused.
    first = subprocess.Popen(ENGRAM + train_args(small_world, out, 100_000), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "checkpoints" / "step-0000010", first)
        t0 = time.time()
        second = subprocess.run(ENGRAM + train_args(small_world, out, 50), capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        assert "in use by another engram run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert time.time() - t0 < 60  # refused at once, not after training
        assert first.poll() is None  # the first was running all along
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    m = manifest(out)
    assert m["status"] == "interrupted" and m["pid"] == first.pid and m["config"]["steps"] == 100_000
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(0, 10 * len(steps), 10))  # one run's rows, each step once
    assert "--steps" in m["argv"] and m["argv"][m["argv"].index("--steps") + 1] == "100000"


def test_sigterm_marks_the_run_interrupted_and_it_resumes_bit_identically(tmp_path, small_world):
    out = tmp_path / "killed"
    proc = subprocess.Popen(ENGRAM + train_args(small_world, out, 60), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "step-0000010", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = manifest(out)
    assert m["status"] == "interrupted" and "SIGTERM" in m["error"] and m["end_time"]
    assert not (out / "summary.json").exists()
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--resume", "--out", str(out)])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref"
    assert runner.invoke(app, train_args(small_world, ref, 60)).exit_code == 0
    a = load_file(str(ref / "checkpoints" / "step-0000060" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step-0000060" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = {"wall_seconds", "seconds", "time", "tokens_per_second"}
    strip = lambda rows: [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in rows]
    assert strip(read_jsonl(ref / "metrics.jsonl")) == strip(read_jsonl(out / "metrics.jsonl"))
    # Resuming the finished run again is a no-op that keeps its summary.
    summary = (out / "summary.json").read_bytes()
    assert runner.invoke(app, ["train", "--resume", "--out", str(out)]).exit_code == 0
    assert (out / "summary.json").read_bytes() == summary
