"""The locator contract, checked for every registered locator (in the manner of scikit-learn's
``parametrize_with_checks``): a new entry in ``engramlab.locate.LOCATORS`` passes every check here
or the suite fails.

Each check runs the locator once (cached per module) on a tiny Llama with a word tokenizer over
two relations, with the locator's ``quick`` settings.
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from engramlab.config import declared_options, from_dict, to_dict
from engramlab.data.facts import load_facts
from engramlab.errors import EngramError
from engramlab.locate import LOCATORS, Result, select
from engramlab.models import tiny_model, wrap_model

from conftest import word_tokenizer

NAMES = sorted(LOCATORS)
_RUNS: dict = {}


def _world():
    if "world" not in _RUNS:
        facts = select(load_facts("country_capital_city,country_language"), limit=6)
        tok = word_tokenizer([f.prompt(j) + " " + f.object for f in facts for j in range(len(f.templates))])
        _RUNS["world"] = (wrap_model(tiny_model("llama", vocab_size=len(tok), n_layers=2, seed=0), tok), facts)
    return _RUNS["world"]


def _run(name: str, again: bool = False):
    key = (name, again)
    if key not in _RUNS:
        lm, facts = _world()
        loc = LOCATORS[name]
        config = loc.config_cls(**loc.quick)
        _RUNS[key] = (config, loc.find(lm, facts, config, progress=False))
    return _RUNS[key]


def _plain(x):
    """What JSON gives back for ``x`` (tuples become lists, float keys strings...)."""
    return json.loads(json.dumps(x))


def _not_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if "seconds" not in k}


def test_the_four_locators_are_registered():
    assert {"recall", "neurons", "dkn", "circuit"} <= set(LOCATORS)
    for name, loc in LOCATORS.items():
        assert loc.name == name and dataclasses.is_dataclass(loc.config_cls)


def test_the_torch_free_config_table_matches_the_registry():
    from engramlab.locate.configs import LOCATOR_CONFIGS

    assert {name: loc.config_cls for name, loc in LOCATORS.items()} == LOCATOR_CONFIGS


def check_one_row_per_fact(name, tmp_path):
    lm, facts = _world()
    _, result = _run(name)
    assert isinstance(result, LOCATORS[name].result_cls) and isinstance(result, Result)
    rows = result.records()
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    for row in rows:  # every row is headed by the fact it is about
        assert list(row)[:3] == ["relation", "subject", "object"], row
    assert sorted((r["relation"], r["subject"], r["object"]) for r in rows) == \
        sorted((f.relation, f.subject, f.object) for f in facts)


def check_summary_is_flat_and_json_serialisable(name, tmp_path):
    summary = _run(name)[1].summary()
    assert summary and all(isinstance(k, str) for k in summary)
    for key, value in summary.items():
        assert value is None or isinstance(value, (bool, int, float, str)), (key, value)
        assert not (isinstance(value, float) and math.isnan(value)) or "faithfulness" in key, key
    assert _plain(summary) == summary


def check_save_load_round_trip_is_equal(name, tmp_path):
    _, result = _run(name)
    result.save(tmp_path)
    # The shared layout: config.json, records.jsonl, summary.json, plus the locator's own files.
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["locator"] == name and set(meta) >= {"config", "model", "stats"}
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == _plain(result.records())
    assert json.loads((tmp_path / "summary.json").read_text()) == _plain(result.summary())
    for extra in LOCATORS[name].files:
        assert (tmp_path / extra).is_file(), extra
    again = LOCATORS[name].load(tmp_path)
    assert type(again) is type(result)
    assert _plain(again.summary()) == _plain(result.summary())
    assert _plain(again.records()) == _plain(result.records())
    assert again.config == _plain(result.config) and again.model == _plain(result.model)


def check_config_round_trips_through_config_json(name, tmp_path):
    config, result = _run(name)
    assert result.config == to_dict(config)  # the Result records exactly the config's fields
    result.save(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert from_dict(LOCATORS[name].config_cls, saved) == config


def check_same_seed_same_result(name, tmp_path):
    _, first = _run(name)
    _, second = _run(name, again=True)
    assert _not_timing(first.summary()) == _not_timing(second.summary())
    assert _plain(first.records()) == _plain(second.records())


def check_a_bad_option_is_a_one_line_error_naming_the_field(name, tmp_path):
    cls = LOCATORS[name].config_cls
    checked = 0
    for opt in declared_options(cls):
        bad = opt.bad_value()
        if bad is None:
            continue
        with pytest.raises(EngramError) as err:
            cls(**{opt.name: bad})
        message = str(err.value)
        assert "\n" not in message and f"{cls.__name__}.{opt.name}" in message and opt.cli_flag in message, message
        checked += 1
    assert checked, f"{cls.__name__} declares no option with a range or choices"


def check_loading_another_locators_directory_says_so(name, tmp_path):
    other = next(n for n in NAMES if n != name)
    _run(other)[1].save(tmp_path)
    with pytest.raises(EngramError) as err:
        LOCATORS[name].load(tmp_path)
    assert "\n" not in str(err.value) and repr(other) in str(err.value)


CHECKS = [check_one_row_per_fact, check_summary_is_flat_and_json_serialisable, check_save_load_round_trip_is_equal,
          check_config_round_trips_through_config_json, check_same_seed_same_result,
          check_a_bad_option_is_a_one_line_error_naming_the_field, check_loading_another_locators_directory_says_so]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, check, tmp_path):
    check(name, tmp_path)


def test_the_documented_example_passes_the_contract(tmp_path):
    """docs/architecture.md's example locator, run as written, passes every check."""
    from engramlab.locate.registry import LOCATORS as registry

    doc = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    block = doc.split("## Adding a locator")[1].split("```python\n")[1].split("```")[0]
    assert 30 <= len(block.strip().splitlines()) <= 70
    try:
        exec(compile(block, "docs/architecture.md", "exec"), {"__name__": "lens_example"})
        assert "lens" in registry
        for check in CHECKS:
            (tmp_path / check.__name__).mkdir()
            check("lens", tmp_path / check.__name__)
        result = _run("lens")[1]
        lm, facts = _world()
        assert len(result.records()[0]["ranks"]) == lm.adapter.n_layers
    finally:
        registry.pop("lens", None)
        for key in [k for k in _RUNS if k[0] == "lens"]:
            _RUNS.pop(key)


def test_an_old_config_key_only_warns(caplog):
    for name in NAMES:
        cls = LOCATORS[name].config_cls
        data = {**to_dict(cls()), "a_setting_from_an_old_version": 1}
        with caplog.at_level("WARNING", logger="engramlab"):
            assert from_dict(cls, data, source="old/config.json") == cls()
        assert any("a_setting_from_an_old_version" in r.getMessage() for r in caplog.records)
        caplog.clear()


def test_limit_counts_per_relation():
    facts = load_facts("country_capital_city,country_language")
    chosen = select(facts, limit=3)
    assert [f.relation for f in chosen] == ["country_capital_city"] * 3 + ["country_language"] * 3
    assert select(facts, relation=["country_language"], limit=2).relations == ["country_language"]
    with pytest.raises(EngramError, match="--limit 0"):
        select(facts, limit=0)
