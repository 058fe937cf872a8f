"""Facts: (subject, relation, object) triples with prompt templates.

This module reads fact files, resolves fact specs (paths or bundled relation names), and provides
the two token-level helpers every locator needs: the target tokens of a fact's object, and
clean/corrupted prompt pairs for patching. File formats and spec resolution are documented in
docs/facts.md; the bundled relations live in ``engramlab/data/facts/lre`` (see the README there).
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from engramlab.errors import EngramError
from engramlab.runs import atomic_write_text

#: Where the bundled LRE relation files are installed (package data shipped inside engramlab).
BUNDLED_LRE_DIR = Path(__file__).resolve().parent / "facts" / "lre"

#: engramlab's own paraphrase templates for the bundled relations (see ``with_paraphrases``).
PARAPHRASES_FILE = Path(__file__).resolve().parent / "facts" / "paraphrases.json"

#: The subject placeholder in templates. Only this exact pair of braces is special, so templates
#: may contain other braces and subjects may contain anything.
PLACEHOLDER = "{}"

_FACT_EXAMPLE = '{"subject": "France", "relation": "country_capital_city", "object": "Paris"}'
_LRE_NEEDS = 'an LRE relation file needs "prompt_templates" and "samples"'
_SAMPLE_NEEDS = 'each sample needs "subject" and "object" strings'
_LINE_NEEDS = "each line needs subject, relation, object"
# Some LRE objects were double-escaped upstream, so after JSON decoding they still read
# "Bras\u00edlia" literally. Runs of such escapes are decoded together to keep surrogate pairs.
_ESCAPED_UNICODE = re.compile(r"(?:\\u[0-9a-fA-F]{4})+")


@dataclass(frozen=True)
class Fact:
    """One fact. ``templates`` contain ``{}`` where the subject goes; ``templates[0]`` is the
    default prompt. Prompts end right before the object (the model should continue with it)."""

    subject: str
    relation: str
    object: str
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        # Accept any sequence (lists come from JSON) but store a tuple so a Fact stays hashable.
        object.__setattr__(self, "templates", tuple(self.templates))
        for field in ("subject", "relation", "object"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise EngramError(f"Fact {self.subject!r}: {field} must be a non-empty string, "
                                  f"got {value!r}")
        if not self.templates:
            raise EngramError(f"Fact {self.subject!r}: no templates; give at least one with {{}}")
        for template in self.templates:
            if not isinstance(template, str) or PLACEHOLDER not in template:
                raise EngramError(f"Fact {self.subject!r}: template {template!r} has no {{}}; "
                                  "put {} where the subject goes")

    def template(self, template_index: int = 0) -> str:
        """The template at ``template_index`` (negative indices count from the end)."""
        if not -len(self.templates) <= template_index < len(self.templates):
            raise EngramError(f"Fact {self.subject!r} ({self.relation}) has "
                              f"{len(self.templates)} template(s); template_index "
                              f"{template_index} is out of range")
        return self.templates[template_index]

    def prompt(self, template_index: int = 0) -> str:
        """The template at ``template_index`` with the subject filled in."""
        return render(self.template(template_index), self.subject)


def render(template: str, subject: str) -> str:
    """Fill ``subject`` into every ``{}`` of ``template``.

    Plain replacement rather than ``str.format``: templates may hold other braces and subjects
    may hold ``{}`` themselves without being re-expanded."""
    return template.replace(PLACEHOLDER, subject)


class FactSet:
    """An ordered, immutable collection of facts and the name of where it came from."""

    def __init__(self, facts: Iterable[Fact] = (), source: str = "<memory>"):
        self._facts = tuple(facts)
        for fact in self._facts:
            if not isinstance(fact, Fact):
                raise TypeError(f"FactSet holds Fact objects, got {type(fact).__name__}")
        self.source = source

    @classmethod
    def from_facts(cls, facts: Iterable[Fact], source: str = "<memory>") -> FactSet:
        """Build a set from Fact objects (e.g. ones made in code)."""
        return cls(facts, source)

    @property
    def facts(self) -> list[Fact]:
        """The facts, in order (a copy: the set itself does not change)."""
        return list(self._facts)

    def __len__(self) -> int:
        return len(self._facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self._facts)

    @overload
    def __getitem__(self, index: int) -> Fact: ...
    @overload
    def __getitem__(self, index: slice) -> FactSet: ...

    def __getitem__(self, index: int | slice) -> Fact | FactSet:
        if isinstance(index, slice):
            return FactSet(self._facts[index], self.source)
        return self._facts[index]

    def __eq__(self, other: object) -> bool:
        # Equal content is what matters; the source is only provenance.
        if not isinstance(other, FactSet):
            return NotImplemented
        return self._facts == other._facts

    def __hash__(self) -> int:
        return hash(self._facts)

    def __repr__(self) -> str:
        return (f"FactSet({len(self)} facts, {len(self.relations)} relations, "
                f"source={self.source!r})")

    @property
    def relations(self) -> list[str]:
        """Relation names in order of first appearance."""
        return list(dict.fromkeys(fact.relation for fact in self._facts))

    def filter(self, relation: str | list[str] | None = None, limit: int | None = None,
               per_relation: int | None = None) -> FactSet:
        """Keep facts of ``relation`` (one name or a list), then the first ``per_relation`` of each
        relation, then the first ``limit`` of those.

        Facts keep their original order whatever the order of the names in ``relation``."""
        facts: Iterable[Fact] = self._facts
        if relation is not None:
            wanted = [relation] if isinstance(relation, str) else list(relation)
            available = self.relations
            unknown = [name for name in wanted if name not in available]
            if unknown:
                raise EngramError(f"{self.source}: unknown relation {unknown[0]!r}; available: "
                                  f"{', '.join(available) or '(none, the set is empty)'}")
            keep = set(wanted)
            facts = [fact for fact in facts if fact.relation in keep]
        if per_relation is not None:
            if isinstance(per_relation, bool) or not isinstance(per_relation, int) or per_relation < 0:
                raise EngramError(f"per_relation must be a whole number >= 0, got {per_relation!r}")
            seen: dict[str, int] = {}
            kept = []
            for fact in facts:
                seen[fact.relation] = seen.get(fact.relation, 0) + 1
                if seen[fact.relation] <= per_relation:
                    kept.append(fact)
            facts = kept
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise EngramError(f"limit must be a whole number >= 0, got {limit!r}")
            facts = list(facts)[:limit]
        return FactSet(facts, self.source)

    def by_relation(self) -> dict[str, FactSet]:
        """One FactSet per relation, in order of first appearance."""
        groups: dict[str, list[Fact]] = {}
        for fact in self._facts:
            groups.setdefault(fact.relation, []).append(fact)
        return {name: FactSet(group, self.source) for name, group in groups.items()}

    def to_jsonl(self, path: str | Path) -> None:
        """Write the set in the JSONL format, atomically (readers never see half a file).

        Templates go on a relation header line, repeated only when they change, so files stay
        readable; ``load_jsonl`` of the result gives back an equal set."""
        declared: dict[str, tuple[str, ...]] = {}
        lines = []
        for fact in self._facts:
            if declared.get(fact.relation) != fact.templates:
                declared[fact.relation] = fact.templates
                lines.append({"relation": fact.relation, "templates": list(fact.templates)})
            lines.append({"subject": fact.subject, "relation": fact.relation,
                          "object": fact.object})
        # ensure_ascii=False keeps "Brasília" readable; load_jsonl splits on "\n" only, so raw
        # U+2028 and friends inside strings are safe.
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        atomic_write_text(Path(path), text)


@dataclass(frozen=True)
class CorruptedPair:
    """A clean prompt and the same template filled with another subject of the same relation
    whose prompt has the same token length, for activation patching."""

    fact: Fact
    corrupt_subject: str
    clean_prompt: str
    corrupt_prompt: str
    corrupt_object: str


# ---------------------------------------------------------------------------- loaders


def load_lre(path: str | Path, *, zero_shot: bool = False) -> FactSet:
    """Load one LRE relation file. The relation name is the file stem.

    ``zero_shot=True`` takes the templates from ``prompt_templates_zs`` (question-style prompts
    meant for instruction-tuned models) instead of ``prompt_templates``."""
    path = Path(path)
    label = _label(path)
    data = _parse_json(_read_text(path, label), label)
    if not isinstance(data, dict):
        raise EngramError(f"{label}: expected a JSON object, got {_json_type(data)}; {_LRE_NEEDS}")
    template_key = "prompt_templates_zs" if zero_shot else "prompt_templates"
    missing = [key for key in (template_key, "samples") if key not in data]
    if missing:
        names = ", ".join(f'"{key}"' for key in missing)
        raise EngramError(f"{label}: missing key {names}; {_LRE_NEEDS}")
    templates = _lre_templates(data[template_key], f"{label} {template_key}")
    samples = data["samples"]
    if not isinstance(samples, list):
        raise EngramError(f'{label}: "samples" must be a list of {{"subject", "object"}} objects, '
                          f"got {_json_type(samples)}")
    if not samples:
        raise EngramError(f'{label}: "samples" is empty; add at least one '
                          '{"subject": ..., "object": ...}')
    facts = []
    for i, sample in enumerate(samples):
        where = f"{label} samples[{i}]"
        if not isinstance(sample, dict):
            raise EngramError(f"{where}: expected an object, got {_json_type(sample)}; "
                              f"{_SAMPLE_NEEDS}")
        subject = _text_field(sample, "subject", where, _SAMPLE_NEEDS, decode=True)
        obj = _text_field(sample, "object", where, _SAMPLE_NEEDS, decode=True)
        facts.append(Fact(subject, path.stem, obj, templates))
    return FactSet(facts, str(path))


def load_jsonl(path: str | Path) -> FactSet:
    """Load the engramlab JSONL format: one fact per line, optional relation header lines.

    A header line ``{"relation": r, "templates": [...]}`` (no subject, no object) sets the
    templates for the lines of relation ``r`` after it; a fact line may carry its own
    ``templates`` or a single ``prompt`` instead. See docs/facts.md."""
    path = Path(path)
    label = _label(path)
    text = _read_text(path, label)
    declared: dict[str, tuple[str, ...]] = {}
    facts = []
    # Split on "\n" only: str.splitlines would also break on U+2028 etc., legal inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{label} line {lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise EngramError(f"{where} column {err.colno}: invalid JSON ({err.msg}); each line "
                              f"must be one JSON object such as {_FACT_EXAMPLE}") from None
        if not isinstance(entry, dict):
            raise EngramError(f"{where}: expected a JSON object, got {_json_type(entry)}; "
                              f"{_LINE_NEEDS}, e.g. {_FACT_EXAMPLE}")
        if "subject" not in entry and "object" not in entry and (
                "templates" in entry or "prompt" in entry):
            relation = _text_field(entry, "relation", where, "a header line needs relation and "
                                   "templates")
            declared[relation] = _line_templates(entry, where, subject=None)
            continue
        subject = _text_field(entry, "subject", where, _LINE_NEEDS)
        relation = _text_field(entry, "relation", where, _LINE_NEEDS)
        obj = _text_field(entry, "object", where, _LINE_NEEDS)
        templates = _line_templates(entry, where, subject) or declared.get(relation)
        if templates is None:
            raise EngramError(f'{where}: no templates for relation "{relation}"; add "templates": '
                              '["The capital city of {} is"] to this line or an earlier header '
                              f'line {{"relation": "{relation}", "templates": [...]}}')
        facts.append(Fact(subject, relation, obj, templates))
    if not facts:
        raise EngramError(f"{label}: no facts (empty file or only header lines); add lines like "
                          f"{_FACT_EXAMPLE}")
    return FactSet(facts, str(path))


def bundled_relations() -> list[str]:
    """Names (file stems) of the bundled LRE relations, sorted."""
    return sorted(path.stem for path in BUNDLED_LRE_DIR.glob("*.json"))


def added_paraphrases() -> dict[str, tuple[str, ...]]:
    """engramlab's added paraphrase templates, {bundled relation: templates} (not LRE data)."""
    label = PARAPHRASES_FILE.name
    data = _parse_json(_read_text(PARAPHRASES_FILE, label), label)
    return {rel: _lre_templates(templates, f"{label} templates.{rel}") for rel, templates in data["templates"].items()}


def with_paraphrases(facts: FactSet) -> FactSet:
    """The same facts with engramlab's added paraphrases appended to the templates of every fact
    of a bundled relation (templates it already has are not repeated; ``templates[0]``, the
    main prompt, stays first). Facts of other relations are unchanged."""
    added = added_paraphrases()
    out = []
    for fact in facts:
        extra = tuple(t for t in added.get(fact.relation, ()) if t not in fact.templates)
        out.append(Fact(fact.subject, fact.relation, fact.object, fact.templates + extra) if extra else fact)
    return FactSet(out, facts.source)


def load_facts(spec: str | Path) -> FactSet:
    """Load facts from a spec.

    A spec is a ``.json`` (LRE) or ``.jsonl`` file, a directory (its ``*.json``/``*.jsonl``
    files, sorted by name), a bundled relation name such as ``country_capital_city``, ``lre`` for
    every bundled relation, or a comma-separated list of those. Existing paths win over bundled
    names. A file named twice (``lre,country_capital_city``) is loaded once."""
    if isinstance(spec, Path) or (isinstance(spec, str) and "," in spec and Path(spec).exists()):
        items = [str(spec)]  # a real path may itself contain commas
    elif isinstance(spec, str):
        items = [item.strip() for item in spec.split(",") if item.strip()]
    else:
        raise EngramError(f"fact spec must be a path or a name, got {type(spec).__name__}")
    if not items:
        raise EngramError(f"empty fact spec {spec!r}; give a .json/.jsonl file, a directory, or "
                          "a bundled name such as country_capital_city")
    seen: set[Path] = set()
    facts: list[Fact] = []
    for item in items:
        for path in _resolve_spec_item(item):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            loaded = load_jsonl(path) if path.suffix == ".jsonl" else load_lre(path)
            facts.extend(loaded)
    return FactSet(facts, ",".join(items))


def _resolve_spec_item(item: str) -> list[Path]:
    """The files one spec item stands for."""
    path = Path(item).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise EngramError(f"{item}: directory has no .json or .jsonl fact files; point at a "
                              "directory of LRE relation files or JSONL fact files")
        return files
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise EngramError(f"{item}: unsupported fact file type {path.suffix!r}; use .json "
                              "(an LRE relation) or .jsonl (one fact per line)")
        return [path]
    if item == "lre":
        return sorted(BUNDLED_LRE_DIR.glob("*.json"))
    bundled = BUNDLED_LRE_DIR / f"{item}.json"
    if "/" not in item and os.sep not in item and bundled.is_file():
        return [bundled]
    names = bundled_relations()
    examples = difflib.get_close_matches(item, names, n=3) or names[:3]
    raise EngramError(f"unknown fact spec {item!r}: no file or directory at {path.absolute()} and "
                      f"no bundled relation of that name; bundled names include "
                      f"{', '.join(examples)} (or 'lre' for all {len(names)})")


# ---------------------------------------------------------------------------- tokens


def target_token_ids(tokenizer: Any, prompt: str, obj: str) -> list[int]:
    """The token ids the model should produce after ``prompt`` to say ``obj``.

    The target is the tokenisation of " " + obj as it continues the prompt: tokenise prompt and
    prompt + " " + obj and take what follows the prompt's tokens. That works alike for BPE,
    SentencePiece and word-level tokenizers. If the prompt's tokens are not a prefix (a merge
    across the boundary), fall back to tokenising " " + obj alone, dropping a lone leading space
    token that the bare object does not start with. A prompt that already ends in whitespace gets
    no extra space. ``tokenizer`` is a transformers tokenizer or a ``tokenizers.Tokenizer``."""
    if not isinstance(obj, str) or not obj.strip():
        raise EngramError(f"object {obj!r} is empty; every fact needs an object to predict")
    separator = "" if prompt[-1:].isspace() else " "
    prompt_ids = _encode(tokenizer, prompt)
    full_ids = _encode(tokenizer, prompt + separator + obj)
    if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids):]
    target = _encode(tokenizer, separator + obj)
    if separator and len(target) > 1 and not str(tokenizer.decode([target[0]])).strip():
        bare = _encode(tokenizer, obj)
        if not bare or bare[0] != target[0]:
            target = target[1:]
    if not target:
        raise EngramError(f"object {obj!r} encodes to no tokens with this tokenizer; check the "
                          "tokenizer or drop this fact")
    return target


def corrupted_pairs(facts: FactSet, tokenizer: Any, template_index: int = 0,
                    seed: int = 0) -> list[CorruptedPair]:
    """For each fact, a corrupted prompt: the same template filled with another subject of the
    same relation whose prompt has the same token count and whose objects do not include the
    fact's object. Partners are picked with ``random.Random(seed)``, so the result is
    deterministic. Facts with no such partner are skipped: the list may be shorter than
    ``facts``. ``corrupt_object`` is the partner's (first) object."""
    rng = random.Random(seed)
    token_counts: dict[str, int] = {}

    def n_tokens(prompt: str) -> int:
        if prompt not in token_counts:
            token_counts[prompt] = len(_encode(tokenizer, prompt))
        return token_counts[prompt]

    # Per relation: distinct subjects in order, all objects of each subject (LRE has subjects
    # with several objects, e.g. antonyms), and subjects bucketed by prompt length per template.
    subjects: dict[str, list[str]] = {}
    objects_of: dict[tuple[str, str], list[str]] = {}
    for fact in facts:
        key = (fact.relation, fact.subject)
        if key not in objects_of:
            subjects.setdefault(fact.relation, []).append(fact.subject)
        objects_of.setdefault(key, []).append(fact.object)
    buckets: dict[tuple[str, str], dict[int, list[str]]] = {}

    pairs = []
    for fact in facts:
        template = fact.template(template_index)
        bucket_key = (fact.relation, template)
        if bucket_key not in buckets:
            by_length: dict[int, list[str]] = {}
            for subject in subjects[fact.relation]:
                by_length.setdefault(n_tokens(render(template, subject)), []).append(subject)
            buckets[bucket_key] = by_length
        clean_prompt = render(template, fact.subject)
        candidates = [
            subject for subject in buckets[bucket_key].get(n_tokens(clean_prompt), [])
            if subject != fact.subject and fact.object not in objects_of[(fact.relation, subject)]
        ]
        if not candidates:
            continue
        partner = rng.choice(candidates)
        pairs.append(CorruptedPair(fact, partner, clean_prompt, render(template, partner),
                                   objects_of[(fact.relation, partner)][0]))
    return pairs


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens (a BOS would shift every position)."""
    if callable(tokenizer):  # transformers tokenizers
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer.encode(text, add_special_tokens=False).ids)  # tokenizers.Tokenizer


# ---------------------------------------------------------------------------- helpers


def _label(path: Path) -> str:
    """How errors name a file: bundled files by name, user files as the user wrote the path."""
    return path.name if path.parent.resolve() == BUNDLED_LRE_DIR else str(path)


def _read_text(path: Path, label: str) -> str:
    try:
        # utf-8-sig tolerates the byte-order mark some editors write.
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EngramError(f"{label}: file not found; check the path") from None
    except IsADirectoryError:
        raise EngramError(f"{label}: is a directory, not a fact file; use load_facts for "
                          "directories") from None
    except UnicodeDecodeError as err:
        raise EngramError(f"{label}: not UTF-8 text (bad byte at offset {err.start}); save the "
                          "file as UTF-8") from None
    except OSError as err:
        raise EngramError(f"{label}: cannot read ({err.strerror}); check permissions") from None


def _parse_json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EngramError(f"{label} line {err.lineno} column {err.colno}: invalid JSON "
                          f"({err.msg}); fix the syntax there") from None


def _json_type(value: Any) -> str:
    """A value's type in JSON words, for messages about files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _decode_escapes(text: str) -> str:
    """Turn literal ``\\uXXXX`` sequences into characters; leave any other text alone."""
    if "\\u" not in text:
        return text
    return _ESCAPED_UNICODE.sub(lambda match: json.loads(f'"{match.group(0)}"'), text)


def _text_field(entry: dict, key: str, where: str, needs: str, decode: bool = False) -> str:
    """A required, non-empty string field, stripped (and unescaped for LRE data)."""
    if key not in entry:
        raise EngramError(f'{where}: missing key "{key}"; {needs}')
    value = entry[key]
    if not isinstance(value, str):
        raise EngramError(f'{where}: "{key}" must be a string, got {_json_type(value)}; {needs}')
    value = (_decode_escapes(value) if decode else value).strip()
    if not value:
        raise EngramError(f'{where}: "{key}" is empty; {needs}')
    _check_encodable(value, f'{where} "{key}"')
    return value


def _check_encodable(text: str, where: str) -> None:
    """Refuse text no tokenizer can take: lone UTF-16 surrogates (JSON "\\ud800", or made by
    decoding a double-escaped "\\\\ud800") are not Unicode characters and cannot be UTF-8 encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise EngramError(f"{where}: character {err.start} ({text[err.start]!a}) is a lone surrogate, not a "
                          f"Unicode character; fix the escape there (a pair like \\ud83d\\ude00 is fine)") from None


def _lre_templates(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise EngramError(f"{where}: must be a non-empty list of templates with {{}} for the "
                          f"subject, got {_json_type(value)}")
    for i, template in enumerate(value):
        if not isinstance(template, str) or PLACEHOLDER not in template:
            raise EngramError(f"{where}[{i}]: template {template!r} has no {{}}; put {{}} where "
                              'the subject goes, e.g. "The capital city of {} is"')
        _check_encodable(template, f"{where}[{i}]")
    return tuple(value)


def _line_templates(entry: dict, where: str, subject: str | None) -> tuple[str, ...] | None:
    """Templates given on a JSONL line (``templates`` list or ``prompt`` string), or None."""
    if "templates" in entry and "prompt" in entry:
        raise EngramError(f'{where}: give either "templates" or "prompt", not both')
    if "prompt" in entry:
        raw = [entry["prompt"]]
        if not isinstance(entry["prompt"], str):
            raise EngramError(f'{where}: "prompt" must be a string, got '
                              f"{_json_type(entry['prompt'])}")
    elif "templates" in entry:
        raw = entry["templates"]
        if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
            raise EngramError(f'{where}: "templates" must be a non-empty list of strings with {{}} '
                              "for the subject")
    else:
        return None
    for i, text in enumerate(raw):
        _check_encodable(text, f"{where} template {i}")
    return tuple(_as_template(text, subject, where) for text in raw)


def _as_template(text: str, subject: str | None, where: str) -> str:
    """A template as given, or a rendered prompt turned back into one by marking the subject."""
    if PLACEHOLDER in text:
        return text
    if subject is None:
        raise EngramError(f"{where}: template {text!r} has no {{}}; put {{}} where the subject "
                          'goes, e.g. "The capital city of {} is"')
    # Prefer whole-word matches so the subject "Ra" does not hit "Paris"; fall back to any
    # occurrence for scripts without word breaks.
    whole_word = re.compile(rf"(?<!\w){re.escape(subject)}(?!\w)")
    if whole_word.search(text):
        return whole_word.sub(lambda _: PLACEHOLDER, text)
    if subject in text:
        return text.replace(subject, PLACEHOLDER)
    raise EngramError(f"{where}: subject {subject!r} not in template {text!r}; put {{}} where the "
                      "subject goes, or write the subject exactly as in \"subject\"")
