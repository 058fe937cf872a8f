"""Every declared option refuses a bad value, generated from the declarations themselves.

For each config dataclass and each field declared with a range or choices, a value outside them
must raise one ``EngramError`` line naming the field and its flag; and every verb that exposes
the field as a flag must exit 2 on it before writing anything. The flags are made from the
declarations, so no verb in engramlab/cli may declare one of them (or its help) again."""

import pytest
import typer
from typer.testing import CliRunner

from engramlab import EngramError
from engramlab.cli import app
from engramlab.config import declared_options
from engramlab.locate.circuits import CircuitConfig
from engramlab.locate.dkn import DKNConfig
from engramlab.locate.dkn.evolvability import EvolveConfig
from engramlab.locate.neurons import NeuronConfig
from engramlab.locate.dkn.clustering import ClusterConfig
from engramlab.locate.regions.config import RegionConfig
from engramlab.locate.trace.config import TraceConfig
from engramlab.recall import RecallConfig
from engramlab.scale.executor import ExecutorConfig
from engramlab.train.trainer import TrainConfig

CONFIGS = [TrainConfig, RecallConfig, NeuronConfig, CircuitConfig, DKNConfig, ClusterConfig, EvolveConfig,
           ExecutorConfig]
# verb -> the configs whose fields it exposes as flags
VERBS = {"train": [TrainConfig], "sweep": [TrainConfig, ExecutorConfig], "recall": [RecallConfig], "neurons": [NeuronConfig], "circuit": [CircuitConfig], "dkn": [DKNConfig, ClusterConfig, EvolveConfig],
         "regions": [RegionConfig], "trace": [TraceConfig]}

CASES = [(cls, opt) for cls in CONFIGS for opt in declared_options(cls) if opt.bad_value() is not None]


def test_every_config_declares_its_options_and_its_defaults_are_valid():
    for cls in CONFIGS:
        assert declared_options(cls), cls
        cls()  # the defaults pass their own declarations


@pytest.mark.parametrize("cls, opt", CASES, ids=[f"{c.__name__}.{o.name}" for c, o in CASES])
def test_a_bad_value_is_one_line_naming_field_and_flag(cls, opt):
    with pytest.raises(EngramError) as caught:
        cls(**{opt.name: opt.bad_value()})
    message = str(caught.value)
    assert message.startswith(f"{cls.__name__}.{opt.name}=") and opt.cli_flag in message and "\n" not in message


def _flags(verb):
    command = typer.main.get_command(app).commands[verb]
    return {flag for param in command.params for flag in getattr(param, "opts", [])}


CLI_CASES = [(verb, cls, opt) for verb, classes in VERBS.items() for cls in classes
             for opt in declared_options(cls) if opt.bad_value() is not None and opt.cli_flag in _flags(verb)]


def test_every_declared_option_is_a_flag_of_its_verb():
    for verb, classes in VERBS.items():
        flags = _flags(verb)
        missing = [f"{c.__name__}.{o.name} ({o.cli_flag})" for c in classes for o in declared_options(c)
                   if o.cli_flag not in flags and o.name != "seed" and verb != "sweep"]  # sweep: a subset
        assert not missing, f"{verb}: {missing}"


@pytest.mark.parametrize("verb, cls, opt", CLI_CASES, ids=[f"{v}-{o.cli_flag}" for v, _, o in CLI_CASES])
def test_the_cli_refuses_it_before_writing(tmp_path, verb, cls, opt):
    bad = opt.bad_value()
    value = ",".join(bad) if isinstance(bad, list) else str(bad)
    out = tmp_path / "out"
    needs = {"train": ["--world", str(tmp_path / "no-world")], "sweep": ["--grid", "n_people=20"]}
    args = [verb, *needs.get(verb, ["--model", str(tmp_path / "not-loaded"), "--facts", "country_capital_city"]),
            "--out", str(out), opt.cli_flag, value]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1 and opt.cli_flag in r.output
    assert not out.exists()


# -- declared once: no verb repeats a field's flag, default or help ---------------------------------------------------
def _cli_option_calls():
    """(file, line, flags, help) of every typer.Option(...) written in engramlab/cli."""
    import ast
    from pathlib import Path

    import engramlab.cli

    for path in sorted(Path(engramlab.cli.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name != "Option":
                continue
            flags = {part for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                     for part in a.value.split("/") if part.startswith("-")}
            text = next((k.value.value for k in node.keywords if k.arg == "help" and isinstance(k.value, ast.Constant)),
                        None)
            yield path.name, node.lineno, flags, text


def test_no_verb_redeclares_a_config_field():
    from engramlab.data.world import WorldConfig

    declared = {}
    for cls in [*CONFIGS, WorldConfig]:
        for o in declared_options(cls):
            for flag in (o.flag or o.cli_flag).split("/"):
                declared[flag] = f"{cls.__name__}.{o.name}"
    helps = {o.help.strip(): f"{cls.__name__}.{o.name}" for cls in CONFIGS for o in declared_options(cls)}
    calls = list(_cli_option_calls())
    assert len(calls) > 10  # the scan sees the verbs' own options
    for file, line, flags, text in calls:
        again = sorted(f for f in flags if f in declared)
        assert not again, f"cli/{file}:{line} declares {again}, which {declared[again[0]]} declares: drop it there"
        assert text is None or text.strip() not in helps, \
            f"cli/{file}:{line} repeats the help of {helps[text.strip()]}"


def test_every_verb_option_that_sets_a_config_field_is_generated():
    """The flags of the config-backed verbs are the declared options plus the verb's own, listed here."""
    own = {"--model", "-m", "--facts", "-f", "--relation", "-r", "--limit", "-n", "--out", "-o", "--overwrite",
           "--seed", "--dtype", "--device", "--device-map", "--config", "--set", "--help", "--paraphrases", "--evolvability",
           "--eapig-json", "--draw", "--world", "-w", "--resume", "--grid", "-g", "--preset", "-p", "--corpus"}
    for verb, classes in VERBS.items():
        generated = {f for c in classes for o in declared_options(c) for f in (o.flag or o.cli_flag).split("/")}
        extra = _flags(verb) - generated - own
        assert not extra, f"{verb}: {sorted(extra)} set config fields without being declared on one"
