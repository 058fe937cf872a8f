"""The synthetic biography world: who exists, what is true of them, and how it is written down.

A world holds a trained population (``people``) and a held-out population (``heldout_people``,
never trained on, names disjoint, same pools) used to measure hallucination. Every person has a
unique full name and six attributes drawn independently and uniformly from the pools. For each
attribute a person's 25 templates are split at random into 20 for training and 5 held out for
evaluation. A training sequence is one biography: the six sentences in shuffled order, each with
a template re-drawn from the person's training templates.

A "continual" world is for further pre-training of a pretrained model: ``n_compl`` people with
invented names plus ``n_rel`` real people from the bundled LRE person relations (a pretrained model
may know them) with new random attributes; each person appears ``frequency`` times in the corpus.
Given an earlier world (``rel_world``), the ``n_rel`` people are instead people that world trained
(a knowledge update: same names and template splits, every attribute re-drawn to a different
value), and the invented names avoid all of its names; pools and templates must be the same, so
the earlier world's word tokenizer covers the new one. ``World.rel_from`` records the source.

    world = build_world("tiny", seed=3)
    bio = world.biography(0, random.Random(0))        # Biography(text, spans, person_index)
    items = world.eval_items("heldout_templates")     # list[EvalItem]
    world.save("runs/world"); assert World.load("runs/world") == world
    update = build_world("continual-tiny", rel_world=world)  # world's people, new attributes
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engramlab.data.names import POOL_NAMES, SIZE_SETTINGS, load_real_names, make_pools, sample_full_names
from engramlab.data.frequencies import draw_frequencies, frequency_bucket, frequency_pmf
from engramlab.data.templates import TEMPLATES, check_template, split_template
from engramlab.errors import EngramError
from engramlab.runs import atomic_write_text

ATTRIBUTES = ("birth_date", "birth_city", "current_city", "university", "major", "employer")
#: Which pool each attribute draws from (birth_date is generated, not pooled).
ATTRIBUTE_POOLS = {"birth_city": "city", "current_city": "city", "university": "university",
                   "major": "major", "employer": "employer"}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
EVAL_SPLITS = ("heldout_templates", "train_templates", "heldout_people")
#: The files of a saved world (``World.save``); a run records their fingerprint.
WORLD_FILES = ("world.json", "people.jsonl", "heldout_people.jsonl")
_FORMAT = "engramlab-world"
_REGENERATE = "regenerate it with `engram world --preset PRESET --out DIR`"
#: Settings a world built from an earlier one (``rel_world``) must share with it: they fix the
#: pools, years and templates, hence the vocabulary and the revised people's template splits.
SHARED_WITH_REL_WORLD = (*SIZE_SETTINGS.values(), "pool_seed", "year_min", "year_max", "n_templates",
                         "n_train_templates")


@dataclass
class WorldConfig:
    """Everything that determines a world; the same config always gives the same world."""

    kind: str = "bio"              # "bio" (train from scratch) or "continual"
    n_people: int = 1000           # trained population (continual: always n_compl + n_rel)
    n_heldout: int = 100           # held-out population, for hallucination
    n_first: int = 400             # name pools: n_first * n_middle * n_last unique full names
    n_middle: int = 400
    n_last: int = 1000
    n_cities: int = 800            # shared by birth_city and current_city
    n_universities: int = 200
    n_majors: int = 100
    n_employers: int = 500
    year_min: int = 1900           # birth years are uniform in [year_min, year_max]
    year_max: int = 2100
    n_templates: int = 25          # templates per attribute (at most 25 are written)
    n_train_templates: int = 20    # per person and attribute; the rest are held out
    seed: int = 0                  # people, attributes, template splits
    pool_seed: int = 0             # pools only, so worlds of any seed share pools and vocabulary
    n_compl: int = 0               # continual: people with invented names
    n_rel: int = 0                 # continual: people with real names
    frequency: str = "1"           # continual: biographies per person, see frequencies.frequency_pmf

    def pool_sizes(self) -> dict[str, int]:
        return {"first": self.n_first, "middle": self.n_middle, "last": self.n_last,
                "city": self.n_cities, "university": self.n_universities,
                "major": self.n_majors, "employer": self.n_employers}

    def validate(self) -> None:
        """Raise EngramError on the first setting that cannot make a world."""
        if self.kind not in ("bio", "continual"):
            raise EngramError(f"world kind {self.kind!r} is unknown; use 'bio' or 'continual'")
        positive = ("n_people", "n_first", "n_middle", "n_last", "n_cities", "n_universities",
                    "n_majors", "n_employers")
        for name in positive + ("n_heldout", "seed", "pool_seed", "n_compl", "n_rel",
                                "year_min", "year_max", "n_templates", "n_train_templates"):
            value, low = getattr(self, name), 1 if name in positive else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise EngramError(f"world setting {name}={value!r} must be an integer >= {low}")
        if self.year_min > self.year_max:
            raise EngramError(f"world setting year_min={self.year_min} is after "
                              f"year_max={self.year_max}; swap them")
        most = min(len(t) for t in TEMPLATES.values())
        if not 1 <= self.n_train_templates < self.n_templates <= most:
            raise EngramError(f"world settings n_train_templates={self.n_train_templates}, "
                              f"n_templates={self.n_templates}: need 1 <= n_train_templates "
                              f"< n_templates <= {most}")
        if self.kind == "continual":
            frequency_pmf(self.frequency)  # raises on a malformed spec
            if self.n_people != self.n_compl + self.n_rel:
                raise EngramError(f"continual world: n_people={self.n_people} must equal "
                                  f"n_compl + n_rel = {self.n_compl + self.n_rel}; set n_compl "
                                  f"and n_rel only")
        elif self.n_compl or self.n_rel:
            raise EngramError("world settings n_compl/n_rel only apply to kind='continual'; "
                              "drop them or use a continual preset")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "world config") -> WorldConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise EngramError(f"{source}: unknown world setting(s) {unknown}; known: "
                              f"{', '.join(names)}")
        return cls(**data)


_TINY_POOLS = dict(n_first=20, n_middle=20, n_last=30, n_cities=40, n_universities=20,
                   n_majors=20, n_employers=40)
#: Named configs. tiny/continual-tiny run on a CPU in seconds to minutes; paper is the scale of
#: the reference experiments (default pools).
PRESETS: dict[str, WorldConfig] = {
    "tiny": WorldConfig(n_people=300, n_heldout=100, **_TINY_POOLS),
    "small": WorldConfig(n_people=5000, n_heldout=1000, n_first=100, n_middle=100, n_last=200),
    "paper": WorldConfig(n_people=100_000, n_heldout=5000),
    "continual-tiny": WorldConfig(kind="continual", n_people=200, n_compl=100, n_rel=100,
                                  n_heldout=100, frequency="choice:1,3,8", **_TINY_POOLS),
    "continual": WorldConfig(kind="continual", n_people=4000, n_compl=2000, n_rel=2000,
                             n_heldout=1000, frequency="zipf:a=1.5,max=20"),
}


@dataclass
class Person:
    """One individual. ``train_templates``/``heldout_templates``: attribute -> template indices.

    ``kind`` is "synthetic" (bio world), "compl" or "rel" (continual: invented or real name);
    ``frequency`` is how many biographies of the person a continual corpus holds (0 for held-out
    people) and ``bucket`` its class: high (>5), medium (2-5), low (1), unseen (0); None in bio
    worlds.
    """

    name: str
    attributes: dict[str, str]
    train_templates: dict[str, list[int]]
    heldout_templates: dict[str, list[int]]
    kind: str = "synthetic"
    frequency: int = 1
    bucket: str | None = None

    def to_dict(self) -> dict:
        return dict(vars(self))  # shallow: asdict's deep copy dominates saving 100k people

    @classmethod
    def from_dict(cls, data: dict) -> Person:
        person = cls(**data)
        for table in (person.attributes, person.train_templates, person.heldout_templates):
            if set(table) != set(ATTRIBUTES):
                raise KeyError(f"attributes {sorted(set(ATTRIBUTES) ^ set(table))}")
        return person


@dataclass(frozen=True)
class Biography:
    """A training sequence. ``spans``: (attribute, char_start, char_end) of each value in text."""

    text: str
    spans: list[tuple[str, int, int]]
    person_index: int


@dataclass(frozen=True)
class EvalItem:
    """One evaluation sentence: ``prompt + " " + value + suffix``.

    ``prompt`` stops before the space that precedes the value, the way the value sits in a
    biography, so any tokenizer splits prompt and value as it did in training.
    ``population`` is "people" or "heldout_people"; ``person_index`` indexes into it.
    """

    person_index: int
    attribute: str
    template_index: int
    prompt: str
    value: str
    suffix: str
    population: str = "people"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.value}{self.suffix}"

    @property
    def value_span(self) -> tuple[int, int]:
        start = len(self.prompt) + 1
        return start, start + len(self.value)


@dataclass
class World:
    """A generated world; compare two with ``==`` (config, pools, templates and everyone).

    ``rel_from``: for a continual world built from an earlier world, where its rel people came
    from: {"fingerprint": that world's ``fingerprint()``, "config": its config as a dict,
    "people": the index in its ``people`` of each rel person, in this world's order}; else None.
    """

    config: WorldConfig
    pools: dict[str, list[str]]
    templates: dict[str, list[str]]      # attribute -> templates with {name} and {value}
    people: list[Person]
    heldout_people: list[Person] = field(default_factory=list)
    rel_from: dict | None = None

    # --- rendering ----------------------------------------------------------------------------
    def render(self, person: Person, attribute: str, template_index: int) -> tuple[str, str, str]:
        """(prompt, value, suffix); the sentence is prompt + " " + value + suffix."""
        head, tail = split_template(self.templates[attribute][template_index])
        return head.replace("{name}", person.name), person.attributes[attribute], tail

    def biography(self, person_index: int, rng: random.Random) -> Biography:
        """Six sentences about ``people[person_index]`` in shuffled order, each from a template
        drawn (with ``rng``) out of that person's training templates, joined by single spaces."""
        person = self.people[person_index]
        order = list(ATTRIBUTES)
        rng.shuffle(order)
        sentences, spans, pos = [], [], 0
        for attribute in order:
            template = rng.choice(person.train_templates[attribute])
            prompt, value, suffix = self.render(person, attribute, template)
            start = pos + len(prompt) + 1
            spans.append((attribute, start, start + len(value)))
            sentence = f"{prompt} {value}{suffix}"
            sentences.append(sentence)
            pos += len(sentence) + 1  # the joining space
        return Biography(" ".join(sentences), spans, person_index)

    def eval_items(self, split: str = "heldout_templates", max_people: int | None = None,
                   max_templates: int | None = None, people: list[int] | None = None,
                   template_choice: str = "random") -> list[EvalItem]:
        """Evaluation sentences of ``split``, one per (person, attribute, template).

        heldout_templates: trained people, their 5 held-out templates (the test of knowledge);
        train_templates: trained people, their training templates (memorisation);
        heldout_people: the never-trained population, its held-out templates (hallucination).
        ``max_people`` keeps a random but fixed subset (the same people for both splits of the
        trained population). ``max_templates`` keeps k templates per (person, attribute):
        ``template_choice="random"`` draws them per person and attribute from a generator
        seeded by (world seed, population, person, attribute), so every template index is
        equally likely and the choice does not depend on which other people are evaluated;
        ``"first"`` keeps the k lowest indices (the behaviour before 2026-12, which favours
        low-index templates). ``people`` lists the person indices explicitly instead (repeats
        allowed: a sample drawn from a training distribution).
        """
        population, chosen = self._eval_people(split, max_people, people)
        members = getattr(self, population)
        items = []
        for i in chosen:
            for attribute in ATTRIBUTES:
                for t in self.eval_templates(split, i, attribute, max_templates, template_choice):
                    prompt, value, suffix = self.render(members[i], attribute, t)
                    items.append(EvalItem(i, attribute, t, prompt, value, suffix, population))
        return items

    def eval_biographies(self, split: str = "heldout_templates", max_people: int | None = None,
                         max_templates: int | None = None, people: list[int] | None = None,
                         template_choice: str = "random") -> list[list[EvalItem]]:
        """Evaluation biographies (the fact-learning paper's protocol): per chosen person, k
        biographies of six sentences, the j-th using the j-th of the k templates that
        ``eval_items`` picks for each attribute (so both modes evaluate the same
        (person, attribute, template) triples), sentences in an order shuffled by a generator
        seeded by (world seed, population, person, j). Each biography is a list of six
        EvalItems; its text is their texts joined by single spaces, as in training.
        """
        population, chosen = self._eval_people(split, max_people, people)
        bios = []
        for i in chosen:
            per_attr = {a: self.eval_templates(split, i, a, max_templates, template_choice) for a in ATTRIBUTES}
            for j in range(min(len(t) for t in per_attr.values())):
                order = list(ATTRIBUTES)
                random.Random(f"engramlab-eval-order-{self.config.seed}-{population}-{i}-{j}").shuffle(order)
                member = getattr(self, population)[i]
                bios.append([EvalItem(i, a, per_attr[a][j], *self.render(member, a, per_attr[a][j]), population)
                             for a in order])
        return bios

    def eval_templates(self, split: str, person_index: int, attribute: str, k: int | None,
                       choice: str = "random") -> list[int]:
        """The template indices ``eval_items`` uses for one (person, attribute), ascending."""
        population = "heldout_people" if split == "heldout_people" else "people"
        person = getattr(self, population)[person_index]
        pool = person.train_templates[attribute] if split == "train_templates" else person.heldout_templates[attribute]
        if k is None or k >= len(pool):
            return list(pool)
        if choice == "first":
            return list(pool[:k])
        if choice != "random":
            raise EngramError(f"--eval-template-choice {choice!r}: use random or first")
        rng = random.Random(f"engramlab-eval-templates-{self.config.seed}-{population}-{person_index}-{attribute}")
        return sorted(rng.sample(list(pool), k))

    def _eval_people(self, split: str, max_people: int | None, people: list[int] | None) -> tuple[str, list[int]]:
        if split not in EVAL_SPLITS:
            raise EngramError(f"eval split {split!r} is unknown; use one of {EVAL_SPLITS}")
        population = "heldout_people" if split == "heldout_people" else "people"
        chosen = list(range(len(getattr(self, population))))
        if people is not None:
            chosen = list(people)
        elif max_people is not None and max_people < len(chosen):
            subset_rng = random.Random(f"engramlab-eval-{self.config.seed}-{population}")
            chosen = sorted(subset_rng.sample(range(len(chosen)), max_people))
        return population, chosen

    def value_counts(self) -> dict[str, int]:
        """Number of possible values per attribute; log of it is the no-knowledge loss."""
        years = self.config.year_max - self.config.year_min + 1
        # Every month has days 1-31: the world is synthetic, so "February 30" is just a value.
        counts = {"birth_date": years * 12 * 31}
        counts.update({a: len(self.pools[p]) for a, p in ATTRIBUTE_POOLS.items()})
        return counts

    def corpus_indices(self) -> np.ndarray:
        """Each trained person's index repeated ``frequency`` times: (sum of frequencies,)."""
        return np.repeat(np.arange(len(self.people)), [p.frequency for p in self.people])

    # --- files --------------------------------------------------------------------------------
    def file_texts(self) -> dict[str, str]:
        """The contents ``save`` writes, file name (WORLD_FILES) -> text."""
        header = {"format": _FORMAT, "version": 1, "config": self.config.to_dict(),
                  "pools": self.pools, "templates": self.templates}
        if self.rel_from is not None:  # only then: older worlds' files stay byte-identical
            header["rel_from"] = self.rel_from
        texts = {"world.json": json.dumps(header, indent=1, ensure_ascii=False) + "\n"}
        for name in ("people", "heldout_people"):
            lines = [json.dumps(p.to_dict(), ensure_ascii=False) for p in getattr(self, name)]
            texts[f"{name}.jsonl"] = "".join(line + "\n" for line in lines)
        return texts

    def fingerprint(self) -> str:
        """sha256 of the saved files, without writing them: equals
        ``engramlab.runs.fingerprint`` of the WORLD_FILES of ``save``'s directory (what a
        training run records as its world input)."""
        digest = hashlib.sha256()
        for name, text in sorted(self.file_texts().items()):  # runs.fingerprint: by file name
            digest.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write world.json (config, pools, templates[, rel_from]), people.jsonl and
        heldout_people.jsonl."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in self.file_texts().items():
            atomic_write_text(out / name, text)
        return out

    @classmethod
    def load(cls, world_dir: str | os.PathLike) -> World:
        """Read a world written by ``save``; EngramError naming the file on any damage."""
        world_dir = Path(world_dir)
        path = world_dir / "world.json"
        if not path.is_file():
            raise EngramError(f"{world_dir}: no world there (no world.json); check the path, or make one with "
                              f"`engram world --preset tiny --out {world_dir}`")
        header = _read_json(path, _read_text(path))
        try:
            if header.get("format") != _FORMAT:
                raise KeyError("format")
            config = WorldConfig.from_dict(header["config"], source="config")
            config.validate()
            pools, templates = header["pools"], header["templates"]
            if set(POOL_NAMES) - set(pools):
                raise KeyError(f"pools {sorted(set(POOL_NAMES) - set(pools))}")
            for attribute in ATTRIBUTES:
                if not isinstance(templates[attribute], list) or not templates[attribute]:
                    raise EngramError(f'"templates"."{attribute}" must be a non-empty list of templates, got '
                                      f"{type(templates[attribute]).__name__}")
                for t in templates[attribute]:
                    check_template(t)
        except KeyError as err:
            raise EngramError(f"{path} lacks key {err}; {_REGENERATE}") from err
        except (TypeError, AttributeError) as err:
            raise EngramError(f"{path} is not a world file ({err}); {_REGENERATE}") from err
        except EngramError as err:
            raise EngramError(f"{path}: {err}; {_REGENERATE}") from err
        people = _read_people(world_dir / "people.jsonl")
        heldout = _read_people(world_dir / "heldout_people.jsonl")
        if len(people) != config.n_people or len(heldout) != config.n_heldout:
            raise EngramError(f"{world_dir}: {len(people)} people and {len(heldout)} held-out "
                              f"people but world.json says {config.n_people} and "
                              f"{config.n_heldout}; {_REGENERATE}")
        for name, group in (("people.jsonl", people), ("heldout_people.jsonl", heldout)):
            _check_people(world_dir / name, group, pools, templates, config)
        rel_from = header.get("rel_from")
        _check_rel_from(path, rel_from, config)
        return cls(config, pools, templates, people, heldout, rel_from)


def _check_rel_from(path: Path, rel_from, config: WorldConfig) -> None:
    """A world.json "rel_from" record is absent, or names a source world and n_rel people."""
    if rel_from is None:
        return
    ok = (isinstance(rel_from, dict) and isinstance(rel_from.get("fingerprint"), str)
          and isinstance(rel_from.get("config"), dict) and isinstance(rel_from.get("people"), list)
          and len(rel_from["people"]) == config.n_rel
          and all(isinstance(i, int) and i >= 0 for i in rel_from["people"]))
    if not ok:
        raise EngramError(f'{path}: "rel_from" must hold the source world\'s "fingerprint", "config" and '
                          f'the {config.n_rel} "people" indices; regenerate it with `engram world --preset '
                          f'PRESET --rel-from WORLD --out DIR`')


def _check_people(path: Path, people: list[Person], pools: dict, templates: dict, config: WorldConfig) -> None:
    """Every template index names a template and every value comes from its pool (or is a date
    of the world's years): an edited file would otherwise crash rendering or train on values the
    no-knowledge baseline does not count."""
    pool_sets = {a: set(pools[p]) for a, p in ATTRIBUTE_POOLS.items()}
    years = range(config.year_min, config.year_max + 1)
    for number, person in enumerate(people, start=1):
        where = f"{path} line {number} ({person.name})"
        for attribute in ATTRIBUTES:
            n = len(templates[attribute])
            for table in (person.train_templates, person.heldout_templates):
                bad = [i for i in table[attribute] if not isinstance(i, int) or not 0 <= i < n]
                if bad:
                    raise EngramError(f"{where}: {attribute} template index {bad[0]!r} is out of range (the world "
                                      f"has {n} {attribute} templates); {_REGENERATE}")
            value = person.attributes[attribute]
            if attribute == "birth_date":
                month, _, rest = str(value).partition(" ")
                day, _, year = rest.partition(", ")
                ok = month in MONTHS and day.isdigit() and 1 <= int(day) <= 31 and year.isdigit() \
                    and int(year) in years
            else:
                ok = value in pool_sets[attribute]
            if not ok:
                raise EngramError(f"{where}: {attribute} {value!r} is not a value this world can hold (not in its "
                                  f"{ATTRIBUTE_POOLS.get(attribute, 'date')} pool); {_REGENERATE}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EngramError(f"{path} cannot be read ({type(err).__name__}); {_REGENERATE}") from err


def _read_json(path: Path, text: str, line: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{path} line {line or err.lineno}"
        raise EngramError(f"{where} does not parse ({err.msg}); {_REGENERATE}") from err


def _read_people(path: Path) -> list[Person]:
    people = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            people.append(Person.from_dict(_read_json(path, line, number)))
        except (KeyError, TypeError) as err:
            raise EngramError(f"{path} line {number} lacks or garbles {err}; "
                              f"{_REGENERATE}") from err
    return people


# --- generation -------------------------------------------------------------------------------

def _make_person(name: str, config: WorldConfig, pools: dict, rng: random.Random,
                 kind: str = "synthetic", frequency: int = 1) -> Person:
    # Every month has days 1-31: the world is synthetic, so "February 30" is just a value.
    day, month, year = rng.randint(1, 31), rng.randrange(12), rng.randint(config.year_min,
                                                                           config.year_max)
    attributes = {"birth_date": f"{MONTHS[month]} {day}, {year}"}
    attributes.update({a: rng.choice(pools[p]) for a, p in ATTRIBUTE_POOLS.items()})
    train, heldout = {}, {}
    all_templates = list(range(config.n_templates))
    for attribute in ATTRIBUTES:
        # Drawing the few held-out ones (not shuffling all 25) keeps a 100k world quick to make.
        held = set(rng.sample(all_templates, config.n_templates - config.n_train_templates))
        train[attribute] = [t for t in all_templates if t not in held]
        heldout[attribute] = sorted(held)
    bucket = frequency_bucket(frequency) if config.kind == "continual" else None
    return Person(name, attributes, train, heldout, kind, frequency, bucket)


def _invented_names(config: WorldConfig, pools: dict, n: int, rng: random.Random,
                    exclude: frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct invented full names not in ``exclude``, or an EngramError saying which
    pools to enlarge."""
    total = config.n_first * config.n_middle * config.n_last - len(exclude)
    if n > total:
        who = (f"n_compl={config.n_compl}" if config.kind == "continual"
               else f"n_people={config.n_people}")
        raise EngramError(f"{who} plus n_heldout={config.n_heldout} needs {n} unique names but "
                          f"the name pools make only {total} (n_first={config.n_first} x "
                          f"n_middle={config.n_middle} x n_last={config.n_last}); raise n_first, "
                          f"n_middle or n_last")
    if not exclude:
        return sample_full_names(pools, n, rng)
    # Draw enough to survive the exclusion, then drop excluded names (order stays random).
    drawn = sample_full_names(pools, min(n + len(exclude), total + len(exclude)), rng)
    return [name for name in drawn if name not in exclude][:n]


def _other_value(pool: list[str], old: str, rng: random.Random) -> str:
    """A value drawn uniformly from ``pool`` without ``old`` (which must be in it)."""
    j = rng.randrange(len(pool) - 1)
    return pool[j + (j >= pool.index(old))]  # skip old's slot: the other len - 1 equally likely


def _revised_person(old: Person, config: WorldConfig, pools: dict, rng: random.Random,
                    frequency: int) -> Person:
    """``old`` with every attribute re-drawn to a value different from its old one (a knowledge
    update); name and template splits stay, so held-out templates stay never-trained."""
    attributes = {}
    for attribute in ATTRIBUTES:
        if attribute == "birth_date":
            value = old.attributes[attribute]
            while value == old.attributes[attribute]:  # a clash has chance 1/(372 * years)
                day, month = rng.randint(1, 31), rng.randrange(12)
                value = f"{MONTHS[month]} {day}, {rng.randint(config.year_min, config.year_max)}"
        else:
            value = _other_value(pools[ATTRIBUTE_POOLS[attribute]], old.attributes[attribute], rng)
        attributes[attribute] = value
    templates = ({a: list(t[a]) for a in ATTRIBUTES} for t in (old.train_templates, old.heldout_templates))
    return Person(old.name, attributes, *templates, "rel", frequency, frequency_bucket(frequency))


def _check_rel_world(config: WorldConfig, rel_world: World) -> None:
    """The earlier world fits: a continual config, enough people, the same pools and templates."""
    if config.kind != "continual":
        raise EngramError("--rel-from (rel_world) needs a continual world; use a continual preset such as "
                          "continual-tiny")
    for name in SHARED_WITH_REL_WORLD:
        ours, theirs = getattr(config, name), getattr(rel_world.config, name)
        if ours != theirs:
            raise EngramError(f"--rel-from: world setting {name}={ours} differs from the earlier world's "
                              f"{name}={theirs}; set {name}={theirs} (--set {name}={theirs}) so both share "
                              f"pools, templates and vocabulary")
    if config.n_rel > len(rel_world.people):
        raise EngramError(f"--rel-from: n_rel={config.n_rel} is more than the earlier world's "
                          f"{len(rel_world.people)} people; lower n_rel")
    for name in sorted({SIZE_SETTINGS[pool] for pool in ATTRIBUTE_POOLS.values()}):
        if getattr(config, name) < 2:  # a revised value must differ from the old one
            raise EngramError(f"--rel-from: {name}={getattr(config, name)} leaves no other value to "
                              f"revise to; raise {name} in both worlds")


def generate_world(config: WorldConfig, exclude_names: frozenset[str] = frozenset(),
                   rel_world: World | None = None) -> World:
    """Make the world ``config`` describes (validated first). Pure function of ``config``,
    ``exclude_names`` (invented names to avoid, e.g. another world's people, so a fine-tuning
    population is new; pools are shared through ``pool_seed``) and ``rel_world``.

    ``rel_world`` (continual only): the rel people are ``n_rel`` of its trained people, chosen
    with the world seed, each with every attribute changed (``_revised_person``); the invented
    names (compl and held-out) avoid all of its names. It must share the settings in
    SHARED_WITH_REL_WORLD (else EngramError naming the first that differs).
    """
    config.validate()
    if rel_world is not None:
        _check_rel_world(config, rel_world)
    pools = make_pools(config.pool_sizes(), seed=config.pool_seed)
    templates = {a: list(TEMPLATES[a][:config.n_templates]) for a in ATTRIBUTES}
    if rel_world is not None and (rel_world.pools != pools or rel_world.templates != templates):
        raise EngramError("--rel-from: the earlier world's pools or templates differ from what its settings "
                          "make now (another engramlab version?); regenerate it with `engram world`")
    rng = random.Random(f"engramlab-world-{config.seed}")
    n_invented = config.n_compl if config.kind == "continual" else config.n_people
    if rel_world is not None:
        exclude_names = frozenset(exclude_names) | {p.name for p in rel_world.people + rel_world.heldout_people}
    invented = _invented_names(config, pools, n_invented + config.n_heldout, rng, frozenset(exclude_names))
    trained, unseen = invented[:n_invented], invented[n_invented:]
    if config.kind == "bio":
        people = [_make_person(name, config, pools, rng) for name in trained]
        heldout = [_make_person(name, config, pools, rng, frequency=0) for name in unseen]
        return World(config, pools, templates, people, heldout)
    if rel_world is None:
        real = load_real_names()
        if config.n_rel > len(real):
            raise EngramError(f"n_rel={config.n_rel} exceeds the {len(real)} real names in the "
                              f"bundled person relations; lower n_rel")
        real = rng.sample(real, config.n_rel)
    else:
        sources = sorted(rng.sample(range(len(rel_world.people)), config.n_rel))
    frequencies = draw_frequencies(config.frequency, config.n_people, rng)
    people = [_make_person(name, config, pools, rng, "compl", f)
              for name, f in zip(trained, frequencies[:config.n_compl])]
    if rel_world is None:
        people += [_make_person(name, config, pools, rng, "rel", f)
                   for name, f in zip(real, frequencies[config.n_compl:])]
    else:
        people += [_revised_person(rel_world.people[i], config, pools, rng, f)
                   for i, f in zip(sources, frequencies[config.n_compl:])]
    heldout = [_make_person(name, config, pools, rng, "compl", 0) for name in unseen]
    rel_from = None if rel_world is None else {"fingerprint": rel_world.fingerprint(),
                                               "config": rel_world.config.to_dict(), "people": sources}
    return World(config, pools, templates, people, heldout, rel_from)


def build_world(preset: str | None = None, exclude_names=frozenset(), rel_world: World | None = None,
                **overrides) -> World:
    """Generate a world from a preset (None: WorldConfig defaults) with keyword overrides.

    Overrides that are None are ignored (handy for CLI flags left unset). For continual worlds
    n_people follows n_compl + n_rel. ``rel_world``: see ``generate_world``.
    """
    if preset is None:
        config = WorldConfig()
    elif preset in PRESETS:
        config = PRESETS[preset]
    else:
        raise EngramError(f"unknown world preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = WorldConfig.from_dict({**config.to_dict(), **overrides}, source="world overrides")
    if config.kind == "continual" and "n_people" not in overrides:
        config.n_people = config.n_compl + config.n_rel
    return generate_world(config, frozenset(exclude_names), rel_world)
