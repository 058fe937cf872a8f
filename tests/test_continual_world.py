"""Continual worlds built from an earlier world: revised people, new names, shared vocabulary,
and continuing a model trained on the earlier world."""

import json
import random
from collections import Counter

import pytest
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.data.frequencies import frequency_bucket
from engramlab.data.wordtok import _pre_tokenizer, build_word_tokenizer, uncovered_words, world_texts
from engramlab.data.world import ATTRIBUTE_POOLS, ATTRIBUTES, WORLD_FILES, World, _other_value, build_world
from engramlab.errors import EngramError
from engramlab.runs import fingerprint, read_jsonl

SIZES = dict(n_compl=20, n_rel=20, n_heldout=10)


@pytest.fixture(scope="module")
def earlier():
    return build_world("tiny", n_people=60, n_heldout=20, seed=2)


@pytest.fixture(scope="module")
def update(earlier):
    return build_world("continual-tiny", rel_world=earlier, seed=1, **SIZES)


def test_rel_people_are_earlier_people_with_every_attribute_changed(earlier, update):
    rel = [p for p in update.people if p.kind == "rel"]
    sources = update.rel_from["people"]
    assert len(rel) == len(sources) == 20 == len(set(sources))
    for person, i in zip(rel, sources):
        old = earlier.people[i]
        assert person.name == old.name
        assert person.train_templates == old.train_templates
        assert person.heldout_templates == old.heldout_templates
        for attribute in ATTRIBUTES:
            assert person.attributes[attribute] != old.attributes[attribute], (person.name, attribute)
        for attribute, pool in ATTRIBUTE_POOLS.items():
            assert person.attributes[attribute] in update.pools[pool]
        assert person.bucket == frequency_bucket(person.frequency) and person.frequency >= 1
    # The revisions are fresh draws, not a fixed shift: many different new cities and employers.
    assert len({p.attributes["current_city"] for p in rel}) > 10
    assert len({p.attributes["employer"] for p in rel}) > 10


def test_invented_people_are_new_names_from_the_same_pools(earlier, update):
    old_names = {p.name for p in earlier.people + earlier.heldout_people}
    compl = [p for p in update.people if p.kind == "compl"]
    new_names = [p.name for p in compl + update.heldout_people]
    assert len(compl) == 20 and len(update.heldout_people) == 10
    assert len(set(new_names)) == len(new_names) and not set(new_names) & old_names
    assert update.pools == earlier.pools and update.templates == earlier.templates
    assert {p.kind for p in update.heldout_people} == {"compl"}
    assert {p.frequency for p in update.heldout_people} == {0}
    for person in compl + update.heldout_people:
        first, middle, last = person.name.split()
        assert first in update.pools["first"] and middle in update.pools["middle"] and last in update.pools["last"]


def test_provenance_is_recorded_and_the_world_loads_back_equal(earlier, update, tmp_path):
    earlier.save(tmp_path / "a")
    assert update.rel_from["fingerprint"] == earlier.fingerprint() == \
        fingerprint(tmp_path / "a" / name for name in WORLD_FILES)
    assert update.rel_from["config"] == earlier.config.to_dict()
    update.save(tmp_path / "b")
    header = json.loads((tmp_path / "b" / "world.json").read_text())
    assert header["rel_from"] == update.rel_from
    loaded = World.load(tmp_path / "b")
    assert loaded == update and loaded.rel_from == update.rel_from
    assert loaded.fingerprint() == fingerprint(tmp_path / "b" / name for name in WORLD_FILES)
    # Same inputs, same world; another seed picks other people.
    assert build_world("continual-tiny", rel_world=earlier, seed=1, **SIZES) == update
    assert build_world("continual-tiny", rel_world=earlier, seed=3, **SIZES).rel_from["people"] != \
        update.rel_from["people"]
    # Without rel_world nothing changes: real names, no rel_from key in world.json.
    plain = build_world("continual-tiny", **SIZES)
    plain.save(tmp_path / "c")
    assert plain.rel_from is None and "rel_from" not in json.loads((tmp_path / "c" / "world.json").read_text())
    header["rel_from"] = {"fingerprint": "x", "config": {}, "people": [1, 2]}  # not n_rel indices
    (tmp_path / "b" / "world.json").write_text(json.dumps(header))
    with pytest.raises(EngramError, match="rel_from"):
        World.load(tmp_path / "b")


def test_other_value_is_uniform_over_the_other_values():
    pool = ["a", "b", "c", "d"]
    rng = random.Random(0)
    counts = Counter(_other_value(pool, "b", rng) for _ in range(6000))
    assert set(counts) == {"a", "c", "d"}
    assert all(abs(c - 2000) < 150 for c in counts.values())  # 3 sigma is ~110


@pytest.mark.parametrize("override, setting", [({"n_cities": 41}, "n_cities"), ({"pool_seed": 1}, "pool_seed"),
                                               ({"year_max": 2000}, "year_max"), ({"n_rel": 61}, "n_rel")])
def test_settings_that_break_the_shared_vocabulary_are_refused(earlier, override, setting):
    with pytest.raises(EngramError, match=setting) as err:
        build_world("continual-tiny", rel_world=earlier, **{**SIZES, **override})
    assert "\n" not in str(err.value)
    with pytest.raises(EngramError, match="continual"):
        build_world("tiny", rel_world=earlier)


def _words_missing_by_hand(tokenizer, world):
    """Reference for uncovered_words: every pre-tokenized piece that is not a vocabulary entry."""
    vocab, pre = tokenizer.get_vocab(), _pre_tokenizer()
    return sorted({w for text in world_texts(world) for w, _ in pre.pre_tokenize_str(text) if w not in vocab})


def test_the_earlier_tokenizer_covers_the_update_but_not_real_names(earlier, update):
    tok = build_word_tokenizer(earlier)
    assert uncovered_words(tok, update) == [] == _words_missing_by_hand(tok, update)
    assert set(build_word_tokenizer(update).get_vocab()) <= set(tok.get_vocab())
    real = build_world("continual-tiny", **SIZES)  # LRE names: words the tiny pools never made
    missing = uncovered_words(tok, real)
    assert missing and missing == _words_missing_by_hand(tok, real)


def test_cli_continues_a_model_of_the_earlier_world_on_the_update(tmp_path):
    runner = CliRunner()
    small = ["--eval-every", "2", "--eval-people", "6", "--eval-templates", "1", "--batch-size", "8",
             "--checkpoints", "none"]
    r = runner.invoke(app, ["world", "--preset", "tiny", "-N", "40", "--n-heldout", "10", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--world", str(tmp_path / "a"), "--steps", "2", "--out", str(tmp_path / "ra"),
                            *small])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["world", "--preset", "continual-tiny", "--rel-from", str(tmp_path / "a"), "--set",
                            "n_rel=10", "--set", "n_compl=10", "--n-heldout", "6", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    b = World.load(tmp_path / "b")
    assert b.rel_from["fingerprint"] == World.load(tmp_path / "a").fingerprint()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["inputs"]["rel_world"] == b.rel_from["fingerprint"]
    r = runner.invoke(app, ["train", "--world", str(tmp_path / "b"), "--init", str(tmp_path / "ra"), "--steps", "2",
                            "--out", str(tmp_path / "rb"), *small])
    assert r.exit_code == 0, r.output
    row = read_jsonl(tmp_path / "rb" / "metrics.jsonl")[-1]
    assert {"eval.attr_acc.kind.rel", "eval.attr_acc.kind.compl", "old.attr_acc"} <= set(row)
    # A mismatched pool size is one line naming the setting; real names are refused by the trainer.
    r = runner.invoke(app, ["world", "--preset", "continual-tiny", "--rel-from", str(tmp_path / "a"), "--set",
                            "n_majors=21", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "n_majors=21" in r.output
    r = runner.invoke(app, ["world", "--preset", "continual-tiny", "--set", "n_rel=5", "--set", "n_compl=5",
                            "--n-heldout", "4", "--out", str(tmp_path / "real")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--world", str(tmp_path / "real"), "--init", str(tmp_path / "ra"), "--steps",
                            "2", "--out", str(tmp_path / "rr"), *small])
    assert r.exit_code == 2 and "no token for" in r.output and "--rel-from" in r.output
