"""``--config FILE`` and ``--set KEY=VALUE``: a command's settings from a YAML / TOML file.

The same settings given as flags, in a YAML file or in a TOML file make the same config; a flag
given wins over ``--set``, which wins over the file, which wins over the defaults; an unknown key
is one line naming the file and the key; a run directory's settings load with a warning for keys
this version does not know."""

import json
import logging
import types
import typing

import pytest
import typer
from typer.testing import CliRunner

from engramlab import EngramError
from engramlab.cli import app
from engramlab.cli.options import configured
from engramlab.config import cli_params, from_dict, load_config, option, settings, to_dict, validate
from engramlab.locate.dkn.evolvability import EvolveConfig
from engramlab.locate.dkn.find import DKNConfig
from engramlab.locate.neurons.find import NeuronConfig
from engramlab.train.trainer import TrainConfig

MODEL = ["--model", "smollm2-135m", "--facts", "country_capital_city"]  # never loaded: run_locator is replaced


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def captured(monkeypatch):
    """Replace run_locator in every locator verb by a recorder of what the verb would run."""
    calls = []

    def fake(name, config, **kw):
        calls.append({"name": name, "config": to_dict(config), "seed": kw["seed"],
                      "sections": {k: to_dict(v) if v is not None else None for k, v in (kw.get("sections") or {}).items()},
                      "extras": kw.get("extras")})
        result = types.SimpleNamespace(records=lambda: [], skipped=[])
        return result, {"n_edges_ungrouped": 0, "n_edges_total": 0}, None

    for verb in ("models", "neurons", "dkn", "circuit"):
        monkeypatch.setattr(f"engramlab.cli.{verb}.run_locator", fake)
    return calls


def _run(args, tmp_path):
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    return r


# -- the same settings three ways --------------------------------------------------------------------------
DKN_FLAGS = ["--steps", "7", "--methods", "persistence,pairs", "--method", "pairs", "--quantile", "0.8",
             "--dbscan-eps", "0.25", "--no-fold-norm", "--evolve-new", "4", "--evolve-lr", "0.01", "--seed", "5"]
DKN_YAML = """
steps: 7
methods: [persistence, pairs]
method: pairs
fold_norm: false
seed: 5
cluster:
  quantile: 0.8
  dbscan_eps: 2.5e-1      # YAML 1.1 reads this as a string: the field's type decides
evolvability:
  n_new: 4
  lr: 1e-2
"""
DKN_TOML = """
steps = 7
methods = "persistence,pairs"
method = "pairs"
fold_norm = false
seed = 5
"cluster.dbscan_eps" = 0.25
"evolvability.lr" = 0.01

[cluster]
quantile = 0.8

[evolvability]
n_new = 4
"""


def test_flags_yaml_and_toml_give_the_same_dkn_config(tmp_path, captured):
    yaml_file = _write(tmp_path / "dkn.yaml", DKN_YAML)
    toml_file = _write(tmp_path / "dkn.toml", DKN_TOML)
    for args in (DKN_FLAGS, ["--config", str(yaml_file)], ["--config", str(toml_file)]):
        r = _run(["dkn", *MODEL, *args, "--evolvability"], tmp_path)
        assert r.exit_code == 0, r.output
    flags, from_yaml, from_toml = captured
    assert flags == from_yaml == from_toml
    config, evolve = flags["config"], flags["sections"]["evolvability"]
    assert config["steps"] == 7 and config["methods"] == ["persistence", "pairs"] and config["fold_norm"] is False
    assert config["cluster"]["quantile"] == 0.8 and config["cluster"]["dbscan_eps"] == 0.25
    assert evolve["n_new"] == 4 and evolve["lr"] == 0.01
    # --seed (or the file's seed) seeds every config: the locator's, its clustering and evolvability
    assert flags["seed"] == config["seed"] == config["cluster"]["seed"] == evolve["seed"] == 5
    # what was not given keeps the field's default
    assert config["max_span"] == DKNConfig().max_span and evolve["steps"] == EvolveConfig().steps


def test_recall_manifests_from_flags_yaml_and_toml_are_equal(tmp_path, tiny_hf_dir):
    args = ["recall", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--limit", "2"]
    yaml_file = _write(tmp_path / "recall.yaml", "template: 1\nbatch_size: 3\n")
    toml_file = _write(tmp_path / "recall.toml", "template = 1\nbatch_size = 3\n")
    manifests = []
    for name, extra in (("flags", ["--template", "1", "--batch-size", "3", "--seed", "4"]),
                        ("yaml", ["--seed", "4", "--config", str(yaml_file)]),
                        ("toml", ["--config", str(toml_file), "--seed", "4"])):
        out = tmp_path / name
        r = CliRunner().invoke(app, [*args, *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
        manifests.append(json.loads((out / "manifest.json").read_text()))
    assert manifests[0]["config"] == manifests[1]["config"] == manifests[2]["config"]
    assert manifests[0]["config"]["recall"] == {"template": 1, "batch_size": 3}
    assert [m["seed"] for m in manifests] == [4, 4, 4]
    # the file is a shortcut for the flags, so the manifest records the same config
    assert manifests[0]["config"]["limit"] == 2


# -- which value wins -----------------------------------------------------------------------------------------
def test_an_explicit_flag_overrides_the_file_and_set_overrides_the_file(tmp_path, captured):
    f = _write(tmp_path / "n.yaml", "steps: 9\nthreshold: 0.3\nmax_rank: 50\n")
    r = _run(["neurons", *MODEL, "--config", str(f), "--steps", "4", "--set", "threshold=0.4"], tmp_path)
    assert r.exit_code == 0, r.output
    got = captured[-1]["config"]
    assert got["steps"] == 4 and got["threshold"] == 0.4 and got["max_rank"] == 50
    # a flag given with its default value still wins over the file
    r = _run(["neurons", *MODEL, "--config", str(f), "--steps", "20"], tmp_path)
    assert r.exit_code == 0, r.output
    assert captured[-1]["config"]["steps"] == 20
    # a flag and --set that disagree: one line, nothing run
    n = len(captured)
    r = _run(["neurons", *MODEL, "--steps", "4", "--set", "steps=5"], tmp_path)
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "--steps" in r.output and len(captured) == n


def test_set_reaches_fields_without_a_flag_and_nested_ones(tmp_path, captured):
    r = _run(["dkn", *MODEL, "--set", "cluster.linkage=single", "--set", "evolvability.arms=dkn,full",
              "--set", "cluster.kmeans_k=none"], tmp_path)
    assert r.exit_code == 0, r.output
    call = captured[-1]
    assert call["config"]["cluster"]["linkage"] == "single" and call["config"]["cluster"]["kmeans_k"] is None
    assert call["sections"] == {"evolvability": None}  # not run without --evolvability
    r = _run(["circuit", *MODEL, "--set", "curve=0.1,0.5,1"], tmp_path)  # a plain field: no flag of its own
    assert r.exit_code == 0, r.output
    assert captured[-1]["config"]["curve"] == [0.1, 0.5, 1.0]
    r = _run(["circuit", *MODEL, "--keep-wrong"], tmp_path)
    assert r.exit_code == 0 and captured[-1]["config"]["require_correct"] is False


def test_sweep_defaults_differ_from_train_and_a_file_sets_them(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("engramlab.train.sweep.run_sweep", lambda path, grid, preset, base, log, executor: seen.append(base) or {})
    f = _write(tmp_path / "sweep.toml", 'lr = 0.01\nschedule = "linear"\nattention_stats = false\n')
    for extra in ([], ["--config", str(f)], ["--config", str(f), "--full-runs"]):
        out = tmp_path / f"sweep{len(seen)}"
        r = CliRunner().invoke(app, ["sweep", "--grid", "n_people=20", *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
    plain, filed, full = seen
    assert (plain.schedule, plain.checkpoints, plain.stop_at_plateau_end) == ("constant", "none", True)
    assert (filed.lr, filed.schedule, filed.attention_stats, filed.checkpoints) == (0.01, "linear", False, "none")
    assert full.stop_at_plateau_end is False and TrainConfig().stop_at_plateau_end is False


# -- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, says", [
    ("bad.yaml", "steps: 7\nclusterz:\n  quantile: 0.8\n", "unknown setting 'clusterz'"),
    ("bad.yaml", "cluster:\n  quantil: 0.8\n", "unknown setting 'cluster.quantil'; did you mean cluster.quantile"),
    ("bad.toml", "[evolvability]\nn_neww = 3\n", "unknown setting 'evolvability.n_neww'"),
    ("bad.toml", "steps = 0\n", "steps=0 (--steps): must be >= 1"),
    ("bad.yaml", "steps: many\n", "steps='many': must be a whole number"),
    ("bad.yaml", "methods: [persistence, nope]\n", "choose from persistence"),
    ("bad.yaml", "- steps\n", "expected a mapping"),
    ("bad.toml", "steps = = 3\n", "not valid TOML"),
    ("bad.yaml", "steps: [1\n", "not valid YAML"),
    ("bad.ini", "steps=3\n", ".yaml, .yml, .toml or .json"),
])
def test_a_bad_file_is_one_line_naming_the_file(tmp_path, captured, name, text, says):
    f = _write(tmp_path / name, text)
    r = _run(["dkn", *MODEL, "--config", str(f)], tmp_path)
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1 and str(f) in r.output and says in r.output, r.output
    assert not captured and not (tmp_path / "out").exists()


def test_a_missing_file_and_a_bad_set(tmp_path, captured):
    r = _run(["recall", *MODEL, "--config", str(tmp_path / "nope.yaml")], tmp_path)
    assert r.exit_code == 2 and "nope.yaml: no such config file" in r.output
    r = _run(["recall", *MODEL, "--set", "batch_size"], tmp_path)
    assert r.exit_code == 2 and "--set 'batch_size': use KEY=VALUE" in r.output
    r = _run(["recall", *MODEL, "--set", "batchsize=3"], tmp_path)
    assert r.exit_code == 2 and "--set: unknown setting 'batchsize'; did you mean batch_size" in r.output
    r = _run(["recall", *MODEL, "--set", "batch_size=0"], tmp_path)
    assert r.exit_code == 2 and "batch_size=0 (--batch-size): must be >= 1" in r.output
    assert not captured


def test_world_takes_a_file_and_set(tmp_path):
    f = _write(tmp_path / "w.yaml", "n_cities: 12\nn_people: 15\n")
    out = tmp_path / "w"
    r = CliRunner().invoke(app, ["world", "--preset", "tiny", "--config", str(f), "--set", "n_heldout=5",
                                 "-N", "11", "--out", str(out)])
    assert r.exit_code == 0, r.output
    overrides = json.loads((out / "manifest.json").read_text())["config"]["overrides"]
    assert overrides == {"n_people": 11, "n_heldout": 5, "seed": 0, "n_cities": 12}
    world = json.loads((out / "world.json").read_text())["config"]
    assert (world["n_cities"], world["n_people"], world["n_heldout"]) == (12, 11, 5)
    r = CliRunner().invoke(app, ["world", "--set", "n_town=3", "--out", str(tmp_path / "w2")])
    assert r.exit_code == 2 and "unknown setting 'n_town'" in r.output


# -- run directories: repeat a run's settings; keys this version does not know only warn ----------------------------
def _old_run(tmp_path, command, config):
    d = tmp_path / "old-run"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"command": command, "status": "complete", "config": config}))
    return d


def test_an_old_run_directory_with_an_unknown_key_only_warns(tmp_path, captured):
    saved = {**to_dict(NeuronConfig(steps=6, refine="dai")), "old_knob": 1}
    run = _old_run(tmp_path, "neurons", {"model": "m", "facts": "f", "limit": 3, "neurons": saved})
    r = _run(["neurons", *MODEL, "--config", str(run)], tmp_path)
    assert r.exit_code == 0, r.output
    assert "ignoring unknown NeuronConfig setting(s) old_knob" in r.output and "error:" not in r.output
    assert captured[-1]["config"] == to_dict(NeuronConfig(steps=6, refine="dai"))


def test_an_old_flat_run_directory_loads(tmp_path, captured):
    # neurons runs before the CLI was generated kept the fields next to model/facts in the manifest
    run = _old_run(tmp_path, "neurons", {"model": "m", "facts": "f", "relation": None, "limit": 3,
                                         "paraphrases": False, "dtype": "float32", "device": "cpu",
                                         **to_dict(NeuronConfig(max_rank=7)), "n_layers": 2})
    r = _run(["neurons", *MODEL, "--config", str(run), "--steps", "2"], tmp_path)
    assert r.exit_code == 0, r.output
    assert captured[-1]["config"] == to_dict(NeuronConfig(max_rank=7, steps=2))
    r = _run(["dkn", *MODEL, "--config", str(run)], tmp_path)
    assert r.exit_code == 2 and "holds a run of `engram neurons`, not dkn" in r.output


def test_from_dict_warns_and_drops_unknown_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="engramlab"):
        cfg = from_dict(DKNConfig, {**to_dict(DKNConfig(steps=3)), "removed_in_v2": True}, source="old/config.json")
    assert cfg == DKNConfig(steps=3) and isinstance(cfg.methods, tuple)
    assert "old/config.json: ignoring unknown DKNConfig setting(s) removed_in_v2" in caplog.text


# -- the library side: load_config, settings, cli_params --------------------------------------------------------------
def test_load_config_yaml_and_toml(tmp_path):
    a = load_config(DKNConfig, _write(tmp_path / "a.yaml", "steps: 3\ncluster: {linkage: single}\n"))
    b = load_config(DKNConfig, _write(tmp_path / "b.toml", 'steps = 3\n[cluster]\nlinkage = "single"\n'))
    c = load_config(DKNConfig, _write(tmp_path / "c.json", '{"steps": 3, "cluster.linkage": "single"}'))
    assert a == b == c == DKNConfig(steps=3, cluster=DKNConfig().cluster.__class__(linkage="single"))
    assert load_config(DKNConfig, tmp_path / "a.yaml", steps=5).steps == 5
    assert load_config(EvolveConfig, _write(tmp_path / "e.yaml", "")) == EvolveConfig()
    with pytest.raises(EngramError, match=r"a\.toml: unknown setting 'stepz'; did you mean steps\?"):
        load_config(DKNConfig, _write(tmp_path / "a.toml", "stepz = 3\n"))


def test_settings_flatten_nested_configs():
    paths = [s.path for s in settings(DKNConfig)]
    assert "cluster.quantile" in paths and "cluster" not in paths and paths.count("seed") == 1
    by = {s.path: s for s in settings(TrainConfig)}
    assert by["lr"].coerce("1e-3", "f") == 0.001 and by["steps"].coerce(3.0, "f") == 3
    assert by["attention_stats"].coerce("no", "f") is False and by["init"].coerce("none", "f") is None
    with pytest.raises(EngramError, match=r"f: steps=2.5: must be a whole number"):
        by["steps"].coerce(2.5, "f")
    with pytest.raises(EngramError, match=r"f: stop_at_plateau_end='maybe': must be true or false"):
        by["stop_at_plateau_end"].coerce("maybe", "f")


def test_cli_params_are_made_from_the_declarations():
    from dataclasses import dataclass, field as dc_field

    @dataclass
    class Inner:
        depth: int = option(2, "How deep.", range=(1, None))

    @dataclass
    class Toy:
        steps: int = option(5, "Steps.", range=(1, None))
        mode: str = option("a", "Mode.", choices=("a", "b"))
        listed: str = option("x", "x | y.", choices=("x", "y"))
        many: tuple[str, ...] = option(("a", "b"), "Several.", choices=("a", "b", "c"), many=True)
        maybe: float | None = option(None, "Sometimes.", range=(0, None))
        on: bool = option(True, "A switch.")
        keep: bool = option(True, "Kept.", flag="--keep/--drop")
        renamed: int = option(1, "Other flag.", flag="--other")
        seed: int = 0
        inner: Inner = dc_field(default_factory=Inner)

        def __post_init__(self):
            validate(self)

    got = {p.name: p for p in cli_params(Toy)}
    assert list(got) == ["steps", "mode", "listed", "many", "maybe", "on", "keep", "renamed", "inner__depth"]
    assert (got["steps"].decl, got["steps"].default, got["steps"].annotation) == ("--steps", 5, int)
    assert got["mode"].help == "Mode. One of: a | b." and got["listed"].help == "x | y."  # choices said once
    assert (got["many"].default, got["many"].annotation) == ("a,b", str) and got["many"].value("b, c") == ("b", "c")
    assert got["maybe"].annotation == typing.Optional[float] and got["maybe"].default is None
    assert got["on"].decl == "--on/--no-on" and got["keep"].decl == "--keep/--drop"
    assert got["renamed"].decl == "--other" and got["inner__depth"].decl == "--depth"
    assert cli_params(Toy, defaults={"steps": 9}, only=("steps",))[0].default == 9

    @dataclass
    class Clash:
        a: int = option(1, "A.", flag="--x")
        b: int = option(2, "B.", flag="--x")

    with pytest.raises(ValueError, match="both want the flag --x"):
        cli_params(Clash)


def test_a_verb_that_redeclares_a_generated_flag_is_refused():
    with pytest.raises(ValueError, match="declared by the verb"):
        @configured(EvolveConfig)
        def verb(n_new: int = typer.Option(3, "--evolve-new"), config: EvolveConfig = None):
            pass


def test_train_from_a_file_and_resume_refuses_a_different_one(tmp_path, monkeypatch):
    from engramlab.data.world import build_world

    world = tmp_path / "world"
    build_world("tiny", n_people=10, n_heldout=3).save(world)
    monkeypatch.setattr("engramlab.train.trainer.train", lambda w, path, cfg, resume=False: {"steps_done": cfg.steps})
    flags = ["--world", str(world), "--steps", "6", "--lr", "0.002", "--sampler", "powerlaw:alpha=1.5",
             "--patch-window", "0:4", "--patch-attention-from", "somewhere:3", "--stop-at-plateau-end", "--seed", "2"]
    f = _write(tmp_path / "train.yaml", f"world: {world}\nsteps: 6\nlr: 2e-3\nsampler: powerlaw:alpha=1.5\n"
                                         "patch_window: '0:4'\npatch_attention_from: somewhere:3\n"
                                         "stop_at_plateau_end: true\nseed: 2\n")
    manifests = []
    for name, args in (("flags", flags), ("file", ["--config", str(f)])):
        r = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        manifests.append(json.loads((tmp_path / name / "manifest.json").read_text()))
    assert manifests[0]["config"] == manifests[1]["config"] and manifests[0]["seed"] == manifests[1]["seed"] == 2
    assert manifests[0]["config"]["patch_window"] == [0, 4] and manifests[0]["config"]["world"] == str(world)
    other = _write(tmp_path / "other.yaml", "lr: 0.5\n")
    r = CliRunner().invoke(app, ["train", "--resume", "--config", str(other), "--out", str(tmp_path / "file")])
    assert r.exit_code == 2 and "lr=0.5" in r.output and "differs from its 0.002" in r.output
