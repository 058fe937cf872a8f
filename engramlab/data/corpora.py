"""Named text corpora for parameter-region studies: loading them as fixed-length token chunks,
and building small multilingual ones from text that installed packages already ship.

Loading (``load_corpora``): each ``--corpus NAME=PATH`` is

- a ``.jsonl`` file: one document per line, from its string field ``text`` (blank lines skipped);
- any other file: plain UTF-8 text, one document;
- a directory: its ``*.txt`` and ``*.jsonl`` files (not recursive, hidden names skipped), read in
  sorted name order as above; other files there (a run's ``manifest.json``) are ignored.

Each document is tokenized without special tokens; the documents are joined into one stream with
the tokenizer's eos token between consecutive documents (nothing between them if the tokenizer
has no eos), and the stream is cut into consecutive chunks of exactly ``seq_len`` ids. The tail
shorter than ``seq_len`` is dropped; with ``max_chunks`` the *first* ``max_chunks`` chunks are kept
(deterministic and seed-free, so the same corpus always gives the same chunks).

Building (``build_corpus``) reads text at run time, so no one else's text is committed here:

- ``django``: the translated strings (msgstr) of Django's gettext catalogues for a language,
  ``conf/locale/<lang>/LC_MESSAGES/*.mo`` plus every ``contrib/<app>/locale/<lang>/...`` one;
- ``english``: the English source strings (msgid) of those catalogues, over every locale Django
  ships (the same UI texts the translations render, so the corpora are parallel);
- ``python``: the source of a fixed list of large pure-Python standard-library modules.

See docs/corpora.md for sizes and licences.
"""

from __future__ import annotations

import gettext
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engramlab.errors import EngramError

if TYPE_CHECKING:  # torch only when chunks are made
    import torch

# ------------------------------------------------------------------------------------------------
# loading


@dataclass
class Corpus:
    """One named corpus as token chunks: ``chunks`` is a LongTensor (n_chunks, seq_len);
    ``n_tokens`` counts the whole token stream (before the tail and ``max_chunks`` cuts).

    ``targets`` (bool, the shape of ``chunks``, optional) marks the tokens that count as
    next-token targets: position t True means token t, predicted from the tokens before it, is
    scored (position 0 never is). None scores every token but the first; a corpus made of
    sentences of facts (``engramlab.locate.regions.facts``) scores only its template or only its
    answer tokens, over the same rows, right-padded (the padding is never a target)."""

    name: str
    path: str
    chunks: "torch.Tensor"
    n_tokens: int
    n_documents: int
    targets: "torch.Tensor | None" = None

    @property
    def n_chunks(self) -> int:
        return int(self.chunks.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.chunks.shape[1])


def parse_corpus_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (NAME, PATH); the name must be non-empty."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise EngramError(f"--corpus {spec!r}: expected NAME=PATH (e.g. --corpus de=corpora/de.txt)")
    return name, Path(path)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EngramError(f"{what}: {path} is not UTF-8 text; convert it to UTF-8") from None
    except OSError as err:
        raise EngramError(f"{what}: cannot read {path} ({err.strerror}); check the path and permissions") from None


def _jsonl_documents(path: Path, what: str) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise EngramError(f"{what}: {path} line {i} is not valid JSON; fix or remove that line") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise EngramError(f"{what}: {path} line {i} has no string field 'text'; every JSONL line needs "
                              f'{{"text": "..."}}')
        docs.append(text)
    return docs


def read_documents(path: Path, what: str = "--corpus") -> list[str]:
    """The documents of a corpus path (file, JSONL file or directory; see the module docstring)."""
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix in (".txt", ".jsonl"))
        except OSError as err:
            raise EngramError(f"{what}: cannot list {path} ({err.strerror}); check the path and permissions") from None
        if not files:
            raise EngramError(f"{what}: directory {path} holds no .txt or .jsonl file; point it at text files")
        return [doc for f in files for doc in read_documents(f, what)]
    if not path.exists():
        raise EngramError(f"{what}: {path} does not exist; check the path")
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, what)
    return [_read_text(path, what)]


def tokenize_documents(docs: list[str], tokenizer) -> list[int]:
    """One token stream: each document without special tokens, eos between consecutive ones."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for doc in docs:
        if not doc.strip():
            continue
        ids = tokenizer.encode(doc, add_special_tokens=False)
        if stream and eos is not None:
            stream.append(int(eos))
        stream.extend(int(i) for i in ids)
    return stream


def load_corpora(specs: list[str], tokenizer, seq_len: int = 512, max_chunks: int | None = None) -> dict[str, Corpus]:
    """Load ``NAME=PATH`` specs into chunked corpora, in the order given (see the module docstring)."""
    import torch

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise EngramError(f"--seq-len {seq_len}: must be an integer >= 2 (a chunk needs an input and a target)")
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1):
        raise EngramError(f"--max-chunks {max_chunks}: must be an integer >= 1 (leave it out for every chunk)")
    if not specs:
        raise EngramError("--corpus: give at least one NAME=PATH")
    parsed: dict[str, Path] = {}
    for spec in specs:
        name, path = parse_corpus_spec(spec)
        if name in parsed:
            raise EngramError(f"--corpus {name}: the name is given twice ({parsed[name]} and {path}); give each "
                              f"corpus its own NAME")
        parsed[name] = path
    corpora = {}
    for name, path in parsed.items():
        what = f"--corpus {name}"
        docs = read_documents(path, what)
        stream = tokenize_documents(docs, tokenizer)
        if not stream:
            raise EngramError(f"{what}: {path} is empty (no text to tokenize); point it at a file with text")
        n_chunks = len(stream) // seq_len
        if n_chunks == 0:
            raise EngramError(f"{what}: {path} has {len(stream)} tokens, shorter than one chunk of --seq-len "
                              f"{seq_len}; add text or lower --seq-len")
        if max_chunks is not None:
            n_chunks = min(n_chunks, max_chunks)
        chunks = torch.tensor(stream[: n_chunks * seq_len], dtype=torch.long).view(n_chunks, seq_len)
        corpora[name] = Corpus(name=name, path=str(path), chunks=chunks, n_tokens=len(stream),
                               n_documents=sum(1 for d in docs if d.strip()))
    return corpora


# ------------------------------------------------------------------------------------------------
# building from installed packages

# Large, pure-Python, stable standard-library modules (read as files, never imported).
PYTHON_MODULES = ("argparse", "inspect", "typing", "dataclasses", "subprocess", "tarfile", "_pydecimal",
                  "email._header_value_parser")
DEFAULT_LANGS = {"django": ("de", "fr", "ru", "zh_Hans"), "english": ("en",), "python": ("python",)}
LICENCES = {
    "django": "BSD-3-Clause (Django and its translations, which are contributed under the same licence)",
    "english": "BSD-3-Clause (the source strings of Django's catalogues)",
    "python": "PSF-2.0 (Python Software Foundation License, the standard library)",
}


def _django_root() -> Path:
    spec = importlib.util.find_spec("django")
    if spec is None or not spec.submodule_search_locations:
        raise EngramError("--from django: Django is not installed; pip install django==5.2.19 (its wheel carries the "
                          ".mo catalogues)")
    return Path(list(spec.submodule_search_locations)[0])


def django_languages() -> list[str]:
    """The locales Django ships translations for (``en`` itself has none)."""
    root = _django_root() / "conf" / "locale"
    return sorted(p.name for p in root.iterdir() if (p / "LC_MESSAGES" / "django.mo").is_file() and p.name != "en")


def _catalogue_files(root: Path, lang: str) -> list[Path]:
    files = sorted((root / "conf" / "locale" / lang / "LC_MESSAGES").glob("*.mo"))
    files += sorted((root / "contrib").glob(f"*/locale/{lang}/LC_MESSAGES/*.mo"))
    return files


def _catalogue(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of one .mo file, sorted by key; each plural form is its own pair, the
    header entry is skipped. GNUTranslations keeps its parsed entries in ``_catalog`` only."""
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog
    keys = sorted(catalog, key=lambda k: (k, -1) if isinstance(k, str) else k)
    return [(k if isinstance(k, str) else k[0], catalog[k]) for k in keys if k != ""]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _unique(lines) -> list[str]:
    seen, out = set(), []
    for line in lines:
        if line and line not in seen:
            seen.add(line)
            out.append(line)
    return out


def _django_lines(lang: str) -> tuple[list[str], list[str]]:
    """Translated strings of ``lang`` (untranslated-looking ones, msgstr == msgid, skipped)."""
    root = _django_root()
    files = _catalogue_files(root, lang)
    lines = _unique(_one_line(msgstr) for f in files for msgid, msgstr in _catalogue(f) if msgstr != msgid)
    return lines, [str(f.relative_to(root.parent)) for f in files]


def _english_lines() -> tuple[list[str], list[str]]:
    """The English msgids of every locale's catalogues (a msgid appears once)."""
    root = _django_root()
    files = [f for lang in django_languages() for f in _catalogue_files(root, lang)]
    lines = sorted(_unique(_one_line(msgid) for f in files for msgid, _ in _catalogue(f)))
    return lines, [f"django/conf/locale/*/LC_MESSAGES/*.mo ({len(files)} files)",
                   "django/contrib/*/locale/*/LC_MESSAGES/*.mo"]


def _python_lines() -> tuple[list[str], list[str]]:
    lines, files = [], []
    for name in PYTHON_MODULES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is None or origin.suffix != ".py" or not origin.is_file():
            raise EngramError(f"--from python: the standard-library module {name} has no .py source here; use a "
                              f"full Python installation")
        lines += origin.read_text(encoding="utf-8").splitlines()
        files.append(f"{name} ({origin.name})")
    return lines, files


def available_languages(source: str) -> list[str]:
    if source == "django":
        return django_languages()
    if source in DEFAULT_LANGS:
        return list(DEFAULT_LANGS[source])
    raise EngramError(f"--from {source!r}: unknown corpus source; one of {', '.join(sorted(DEFAULT_LANGS))}")


def check_languages(source: str, langs: list[str] | None) -> list[str]:
    """The languages to build (``None``: the source's defaults), duplicates dropped; an unknown
    source or language is an error listing what is available."""
    available = available_languages(source)
    langs = list(dict.fromkeys(langs if langs is not None else DEFAULT_LANGS[source]))
    if not langs:
        raise EngramError(f"--lang: give at least one language for --from {source}; available: "
                          f"{', '.join(available)}")
    unknown = [lang for lang in langs if lang not in available]
    if unknown:
        raise EngramError(f"--lang {','.join(unknown)}: not available for --from {source}; available: "
                          f"{', '.join(available)}")
    return langs


def _provenance(source: str) -> dict[str, Any]:
    if source == "python":
        return {"package": "python (standard library)", "version": platform.python_version(),
                "licence": LICENCES[source]}
    return {"package": "django", "version": importlib.metadata.version("django"), "licence": LICENCES[source]}


def build_corpus(source: str, langs: list[str] | None, out_dir: str | Path) -> dict[str, dict]:
    """Write ``<lang>.txt`` (one string per line, UTF-8, ending in a newline) for each language and
    ``sources.json`` (package, version, licence, files, sizes, sha256) into ``out_dir``.

    ``langs`` None: the source's defaults (``DEFAULT_LANGS``). Returns {lang: {n_lines, n_chars,
    file}}. The output depends only on the installed package versions, so it is byte-identical
    from one build to the next."""
    from engramlab.runs import atomic_write_json, atomic_write_text

    langs = check_languages(source, langs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes, records = {}, {}
    for lang in langs:
        lines, files = (_django_lines(lang) if source == "django" else
                        _english_lines() if source == "english" else _python_lines())
        text = "\n".join(lines) + "\n"
        atomic_write_text(out / f"{lang}.txt", text)
        sizes[lang] = {"n_lines": len(lines), "n_chars": len(text), "file": f"{lang}.txt"}
        records[lang] = {**sizes[lang], "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "from": files}
    atomic_write_json(out / "sources.json", {"source": source, **_provenance(source), "languages": records})
    return sizes
