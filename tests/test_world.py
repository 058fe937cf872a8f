"""The biography world: generation, files, rendering, tokenization and masks."""

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engramlab.data.names import LRE_DIR, load_real_names
from engramlab.data.templates import TEMPLATES, check_template
from engramlab.data.wordtok import build_word_tokenizer, encode_biographies, encode_eval_items
from engramlab.data.world import ATTRIBUTE_POOLS, ATTRIBUTES, MONTHS, PRESETS, World, build_world
from engramlab.errors import EngramError


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", seed=3)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_word_tokenizer(world)


@pytest.fixture(scope="module")
def bios(world):
    rng = random.Random(0)
    return [world.biography(i, rng) for i in range(8)]


def test_same_seed_same_world_and_byte_identical_resave(world, tmp_path):
    assert build_world("tiny", seed=3) == world
    assert build_world("tiny", seed=4).people != world.people
    world.save(tmp_path / "a")
    loaded = World.load(tmp_path / "a")
    assert loaded == world
    loaded.save(tmp_path / "b")
    for name in ("world.json", "people.jsonl", "heldout_people.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))  # atomic writes leave no temp files


def test_names_unique_and_disjoint_between_populations(world):
    names = [p.name for p in world.people]
    heldout = [p.name for p in world.heldout_people]
    assert len(set(names)) == len(names) == world.config.n_people
    assert len(set(heldout)) == len(heldout) == world.config.n_heldout
    assert not set(names) & set(heldout)
    for pool in world.pools.values():
        assert len(set(pool)) == len(pool)
    first, middle, last = (set(world.pools[p]) for p in ("first", "middle", "last"))
    for name in names + heldout:
        f, m, l = name.split()
        assert f in first and m in middle and l in last


def test_attribute_values_within_pools_and_counts(world):
    config = world.config
    assert len(world.pools["city"]) == config.n_cities
    assert len(world.pools["employer"]) == config.n_employers
    for person in world.people + world.heldout_people:
        for attribute, pool in ATTRIBUTE_POOLS.items():
            assert person.attributes[attribute] in world.pools[pool]
        month_day, year = person.attributes["birth_date"].split(", ")
        month, day = month_day.split()
        assert month in MONTHS and 1 <= int(day) <= 31
        assert config.year_min <= int(year) <= config.year_max
    counts = world.value_counts()
    assert counts["birth_date"] == (config.year_max - config.year_min + 1) * 12 * 31
    assert counts["major"] == config.n_majors and counts["birth_city"] == config.n_cities
    # Uniform draws: with 300 people, most of the 40 cities show up.
    assert len({p.attributes["current_city"] for p in world.people}) > 30


def test_templates_and_per_person_split(world):
    for attribute in ATTRIBUTES:
        assert len(TEMPLATES[attribute]) == 25 == len(set(TEMPLATES[attribute]))
        for template in TEMPLATES[attribute]:
            check_template(template)
    splits = set()
    for person in world.people:
        for attribute in ATTRIBUTES:
            train, held = person.train_templates[attribute], person.heldout_templates[attribute]
            assert len(train) == 20 and len(held) == 5
            assert sorted(train + held) == list(range(25))
            splits.add(tuple(held))
    assert len(splits) > 100  # drawn per person, not one global split


def test_eval_items_use_heldout_templates_only(world):
    items = world.eval_items("heldout_templates")
    assert len(items) == world.config.n_people * 6 * 5
    for item in items:
        person = world.people[item.person_index]
        assert item.template_index in person.heldout_templates[item.attribute]
        assert item.value == person.attributes[item.attribute]
        assert item.text[slice(*item.value_span)] == item.value
    unseen = world.eval_items("heldout_people", max_people=10)
    assert {it.population for it in unseen} == {"heldout_people"}
    for item in unseen:
        person = world.heldout_people[item.person_index]
        assert item.template_index in person.heldout_templates[item.attribute]
    subset = world.eval_items("train_templates", max_people=7, max_templates=2)
    assert subset == world.eval_items("train_templates", max_people=7, max_templates=2)
    assert len({it.person_index for it in subset}) == 7 and len(subset) == 7 * 6 * 2
    with pytest.raises(EngramError, match="eval split"):
        world.eval_items("nope")


def test_value_counts_are_what_the_generator_can_emit():
    """value_counts() against the values the generator actually draws for many people."""
    world = build_world("tiny", n_people=3000, n_heldout=0, year_min=2000, year_max=2004, n_cities=7,
                        n_universities=5, n_majors=3, n_employers=6)
    counts = world.value_counts()
    seen = {a: {p.attributes[a] for p in world.people} for a in ATTRIBUTES}
    for attribute in ATTRIBUTE_POOLS:  # 3000 draws from <= 7 values: every value shows up
        assert len(seen[attribute]) == counts[attribute]
    assert len(seen["birth_city"] | seen["current_city"]) == counts["birth_city"]
    months, days, years = set(), set(), set()
    for date in seen["birth_date"]:
        month, day, year = date.replace(",", "").split()
        months.add(month), days.add(int(day)), years.add(int(year))
    assert months == set(MONTHS) and days == set(range(1, 32)) and years == set(range(2000, 2005))
    assert counts["birth_date"] == len(months) * len(days) * len(years) == 1860
    assert len(seen["birth_date"]) > 1000  # dates combine independently (not a few fixed dates)


def test_eval_templates_are_drawn_per_person_not_the_lowest_indices(world):
    items = world.eval_items("heldout_templates", max_templates=2)
    first = world.eval_items("heldout_templates", max_templates=2, template_choice="first")
    for it in items:
        assert it.template_index in world.people[it.person_index].heldout_templates[it.attribute]
    for chosen in (items, first):
        per = {}
        for it in chosen:
            per.setdefault((it.person_index, it.attribute), []).append(it.template_index)
        assert all(len(set(v)) == 2 for v in per.values()) and len(per) == world.config.n_people * 6
    # "first" keeps the two lowest held-out indices; the random draw uses all five positions
    # of the sorted held-out list about equally (1/5 each for 2 of 5 drawn; 300*6 pairs).
    rank = [world.people[it.person_index].heldout_templates[it.attribute].index(it.template_index) for it in items]
    share = [rank.count(r) / len(rank) for r in range(5)]
    assert all(abs(x - 0.2) < 0.03 for x in share), share
    assert {world.people[it.person_index].heldout_templates[it.attribute].index(it.template_index)
            for it in first} == {0, 1}
    # Seeded per person: the same for a subset, for another call, for the training-template split.
    subset = world.eval_items("heldout_templates", max_people=9, max_templates=2)
    by_person = {(it.person_index, it.attribute, it.template_index) for it in items}
    assert all((it.person_index, it.attribute, it.template_index) in by_person for it in subset)
    assert subset == world.eval_items("heldout_templates", max_people=9, max_templates=2)
    train = world.eval_items("train_templates", max_people=50, max_templates=3)
    assert max(world.people[it.person_index].train_templates[it.attribute].index(it.template_index)
               for it in train) > 10
    with pytest.raises(EngramError, match="--eval-template-choice"):
        world.eval_items("heldout_templates", max_templates=2, template_choice="last")


def test_name_precedes_value_in_every_sentence(world):
    person = world.people[0]
    for attribute in ATTRIBUTES:
        for t in range(25):
            prompt, value, suffix = world.render(person, attribute, t)
            sentence = f"{prompt} {value}{suffix}"
            assert sentence.index(person.name) + len(person.name) <= len(prompt)
            assert sentence.endswith(value + ".") and suffix == "."


def test_biography_has_six_training_sentences_with_the_name(world, bios):
    for bio in bios:
        person = world.people[bio.person_index]
        assert sorted(a for a, _, _ in bio.spans) == sorted(ATTRIBUTES)
        assert bio.text.count(person.name) == 6
        start = 0
        for attribute, s, e in bio.spans:
            assert bio.text[s:e] == person.attributes[attribute]
            sentence = bio.text[start:e + 1]
            assert person.name in sentence
            allowed = {"{} {}{}".format(*world.render(person, attribute, t))
                       for t in person.train_templates[attribute]}
            assert sentence in allowed
            start = e + 2  # past the period and the joining space
        assert start == len(bio.text) + 1
    orders = {tuple(a for a, _, _ in bio.spans) for bio in bios}
    assert len(orders) > 1  # sentences are shuffled


def test_word_tokenizer_round_trip_and_save(world, tokenizer, bios, tmp_path):
    for bio in bios:
        ids = tokenizer(bio.text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == bio.text
    for person in world.heldout_people:
        assert tokenizer.unk_token_id not in tokenizer(person.name)["input_ids"]
    split = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert [w for w, _ in split("Smith's home is in Paris, 1987.")] == \
        ["Smith", "'s", "home", "is", "in", "Paris", ",", "1987", "."]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(bios[0].text)["input_ids"] == tokenizer(bios[0].text)["input_ids"]


def _check_masks(tokenizer, world, bios, batch):
    assert batch["input_ids"].shape == batch["value_mask"].shape == batch["attribute_ids"].shape
    for row, bio in enumerate(bios):
        person = world.people[bio.person_index]
        ids = batch["input_ids"][row]
        bos = tokenizer.bos_token_id
        assert ids[0] == (bos if bos is not None else tokenizer.eos_token_id)
        assert int(batch["first_value_mask"][row].sum()) == 6
        for a, attribute in enumerate(ATTRIBUTES):
            tokens = ids[batch["attribute_ids"][row] == a]
            assert tokenizer.decode(tokens).strip() == person.attributes[attribute]
            first = batch["first_value_mask"][row] & (batch["attribute_ids"][row] == a)
            assert int(first.sum()) == 1
        length = int(batch["attention_mask"][row].sum())
        assert ids[length - 1] == tokenizer.eos_token_id
    assert (batch["value_mask"] == (batch["attribute_ids"] >= 0)).all()


def test_masks_with_word_tokenizer(world, tokenizer, bios):
    _check_masks(tokenizer, world, bios, encode_biographies(tokenizer, bios))
    with pytest.raises(EngramError, match="max_len"):
        encode_biographies(tokenizer, bios, max_len=10)


def test_masks_with_a_bpe_tokenizer(world, bios):
    # A small byte-level BPE trained here (no download): subword pieces, "Ġ"-prefixed tokens.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(1)
    bpe.train_from_iterator([world.biography(i, rng).text for i in range(20, 60)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    batch = encode_biographies(tok, bios)
    assert batch["input_ids"].shape[1] > encode_biographies(build_word_tokenizer(world),
                                                            bios)["input_ids"].shape[1]
    _check_masks(tok, world, bios, batch)
    pieces = tok.convert_ids_to_tokens(batch["input_ids"][0][batch["value_mask"][0]])
    assert any(p.startswith("Ġ") for p in pieces)  # offsets there include the space
    assert batch["value_mask"][0].sum() > 6 * 2  # values split into several subwords


def test_encode_eval_items(world, tokenizer):
    items = world.eval_items("heldout_templates", max_people=3)
    batch = encode_eval_items(tokenizer, items)
    assert batch["attribute_ids"].shape == (len(items),)
    for row, item in enumerate(items):
        ids = batch["input_ids"][row]
        assert tokenizer.decode(ids[batch["value_mask"][row]]) == item.value
        start = int(batch["value_start"][row])
        assert tokenizer.decode(ids[1:start]) == item.prompt
        assert ATTRIBUTES[int(batch["attribute_ids"][row])] == item.attribute


def test_too_many_people_names_the_pools():
    with pytest.raises(EngramError, match=r"n_people=20000 .*n_first=20.*raise n_first"):
        build_world("tiny", n_people=20000)


def test_unknown_preset_and_setting():
    with pytest.raises(EngramError, match="tiny, small, paper"):
        build_world("huge")
    with pytest.raises(EngramError, match="n_peopel"):
        build_world("tiny", n_peopel=3)
    assert set(PRESETS) >= {"tiny", "small", "paper", "continual-tiny", "continual"}


def test_damaged_world_files_name_the_file(world, tmp_path):
    world.save(tmp_path)
    path = tmp_path / "world.json"
    good = path.read_text()
    path.write_text(good[:200])
    with pytest.raises(EngramError, match=r"world\.json line \d+ does not parse.*engram world"):
        World.load(tmp_path)
    header = json.loads(good)
    del header["pools"]
    path.write_text(json.dumps(header))
    with pytest.raises(EngramError, match=r"world\.json lacks .*pools.*engram world"):
        World.load(tmp_path)
    path.write_text(good)
    people = tmp_path / "people.jsonl"
    lines = people.read_text().splitlines()
    lines[4] = json.dumps({k: v for k, v in json.loads(lines[4]).items() if k != "attributes"})
    people.write_text("\n".join(lines) + "\n")
    with pytest.raises(EngramError, match=r"people\.jsonl line 5 lacks .*attributes"):
        World.load(tmp_path)
    (tmp_path / "people.jsonl").unlink()
    with pytest.raises(EngramError, match=r"people\.jsonl cannot be read"):
        World.load(tmp_path)


def test_continual_world_real_names_and_buckets():
    world = build_world("continual-tiny")
    config = world.config
    assert len(world.people) == config.n_compl + config.n_rel == config.n_people
    rel = [p for p in world.people if p.kind == "rel"]
    assert len(rel) == config.n_rel and sum(p.kind == "compl" for p in world.people) == 100
    subjects = set()
    for path in LRE_DIR.glob("person_*.json"):
        subjects |= {s["subject"] for s in json.loads(path.read_text())["samples"]}
    assert all(p.name in subjects for p in rel)
    assert {p.name for p in rel} <= set(load_real_names())
    assert len({p.name for p in world.people + world.heldout_people}) == 300
    expected = {1: "low", 3: "medium", 8: "high"}
    for person in world.people:
        assert person.bucket == expected[person.frequency]
    assert {p.frequency for p in world.people} == {1, 3, 8}
    assert all(p.frequency == 0 and p.bucket == "unseen" for p in world.heldout_people)
    assert len(world.corpus_indices()) == sum(p.frequency for p in world.people)
    assert build_world("continual-tiny", n_rel=10).config.n_people == 110
    with pytest.raises(EngramError, match="frequency spec"):
        build_world("continual-tiny", frequency="zipf:a=x")
