"""Every declared option refuses a bad value, generated from the declarations themselves.

For each config dataclass and each field declared with a range or choices, a value outside them
must raise one ``EngramError`` line naming the field and its flag; and every verb that exposes
the field as a flag must exit 2 on it before writing anything."""

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
from engramlab.recall import RecallConfig
from engramlab.train.trainer import TrainConfig

CONFIGS = [TrainConfig, RecallConfig, NeuronConfig, CircuitConfig, DKNConfig, ClusterConfig, EvolveConfig]
# verb -> the configs whose fields it exposes as flags
VERBS = {"train": [TrainConfig], "sweep": [TrainConfig], "recall": [RecallConfig], "neurons": [NeuronConfig], "circuit": [CircuitConfig], "dkn": [DKNConfig, ClusterConfig, EvolveConfig]}

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
