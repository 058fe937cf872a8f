"""Cases of the reliability probe that needed a world or a run: each now a clean one-line error.

The numbers are the probe's case numbers (tracebacks, silent wrong results, damage)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from engramlab import EngramError
from engramlab.cli import app
from engramlab.data.world import World, build_world


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "world"
    build_world("tiny", n_people=20, n_heldout=5).save(path)
    return path


def edited(tmp_path, world_dir, edit):
    path = tmp_path / "edited"
    shutil.copytree(world_dir, path)
    lines = (path / "people.jsonl").read_text().splitlines()
    person = json.loads(lines[0])
    edit(person)
    lines[0] = json.dumps(person)
    (path / "people.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case, edit, message", [
    (85, lambda p: p["train_templates"]["major"].__setitem__(0, 99), "major template index 99 is out of range"),
    (86, lambda p: p["attributes"].__setitem__("employer", "Nowhere Inc"), "employer 'Nowhere Inc' is not a value"),
    (86, lambda p: p["attributes"].__setitem__("birth_date", "Smarch 3, 1950"), "birth_date 'Smarch 3, 1950'"),
])
def test_edited_people_files(tmp_path, world_dir, case, edit, message):
    with pytest.raises(EngramError, match=message) as caught:
        World.load(edited(tmp_path, world_dir, edit))
    assert "people.jsonl line 1" in str(caught.value)


def test_template_list_replaced_by_a_string(tmp_path, world_dir):  # case 80
    path = tmp_path / "w"
    shutil.copytree(world_dir, path)
    header = json.loads((path / "world.json").read_text())
    header["templates"]["major"] = "{name} studied {value}."
    (path / "world.json").write_text(json.dumps(header))
    with pytest.raises(EngramError, match=r'"templates"."major" must be a non-empty list of templates, got str'):
        World.load(path)


def test_a_missing_world_says_check_the_path(tmp_path, world_dir):  # case 74
    r = CliRunner().invoke(app, ["world", "--preset", "tiny", "--n-people", "10", "--disjoint-from",
                                 str(tmp_path / "typo"), "--out", str(tmp_path / "w2")])
    assert r.exit_code == 2 and "no world there" in r.output and "regenerate" not in r.output


TRAIN = ["--steps", "8", "--batch-size", "4", "--eval-every", "4", "--eval-people", "4", "--eval-templates", "1",
         "--checkpoints", "every:4"]


def test_resume_checks_command_world_and_flags(tmp_path, world_dir):
    runner = CliRunner()
    recall_like = tmp_path / "recall"
    recall_like.mkdir()
    (recall_like / "manifest.json").write_text(json.dumps({"command": "recall", "config": {"model": "m"}}))
    r = runner.invoke(app, ["train", "--resume", "--out", str(recall_like)])  # case 108
    assert r.exit_code == 2 and "holds a run of `engram recall`, not train" in r.output
    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--world", str(world), "--out", str(run), *TRAIN])
    assert r.exit_code == 0, r.output
    # case 124: a fresh run into a finished run's directory is refused, its checkpoints kept
    r = runner.invoke(app, ["train", "--world", str(world), "--out", str(run), "--seed", "1", *TRAIN])
    assert r.exit_code == 2 and "complete train run" in r.output
    assert (run / "checkpoints" / "step-0000008").is_dir()
    # a flag that contradicts the saved config
    r = runner.invoke(app, ["train", "--resume", "--out", str(run), "--lr", "0.5"])
    assert r.exit_code == 2 and "--lr 0.5 differs from its 0.001" in r.output
    # the same setting in another spelling is no contradiction: "2:4" (as manifests before the
    # config was typed stored it) against --patch-window 2:4, both parsed to the pair (2, 4)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["patch_window"] = "2:4"
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = runner.invoke(app, ["train", "--resume", "--out", str(run), "--patch-window", "2:4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--resume", "--out", str(run), "--patch-window", "2:5"])
    assert r.exit_code == 2 and "differs from its '2:4'" in r.output
    # a field the manifest lacks (a run made before it existed) ran at its default: a flag that
    # says otherwise is a contradiction too, not silently dropped
    del manifest["config"]["grad_accum"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = runner.invoke(app, ["train", "--resume", "--out", str(run), "--grad-accum", "2"])
    assert r.exit_code == 2 and "--grad-accum 2 differs from its 1" in r.output
    # case 126: the world was regenerated since the run started
    summary = (run / "summary.json").read_bytes()
    build_world("tiny", n_people=20, n_heldout=5, seed=7).save(world)
    r = runner.invoke(app, ["train", "--resume", "--out", str(run)])
    assert r.exit_code == 2 and "started on other input (world differs" in r.output
    assert (run / "summary.json").read_bytes() == summary and json.loads(
        (run / "manifest.json").read_text())["status"] == "complete"
