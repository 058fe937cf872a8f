"""Named corpora: chunking against hand-computed token ids, every bad input as one EngramError
line, and the corpus builder over Django's catalogues / Python's stdlib (right script, same bytes
every build)."""

import importlib.metadata
import json
import unicodedata

import pytest
import torch

from conftest import word_tokenizer
from engramlab.data.corpora import build_corpus, load_corpora
from engramlab.errors import EngramError

DOCS = ["a b c", "d e", "f g h i"]


@pytest.fixture(scope="module")
def tok():
    t = word_tokenizer(DOCS)
    # the vocabulary the ids below are computed from: <unk> 0, <pad> 1, <eos> 2, then a..i = 3..11
    assert t.convert_tokens_to_ids(["<eos>", "a", "i"]) == [2, 3, 11] and t.eos_token_id == 2
    return t


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# Stream of the three documents, eos between: a b c <eos> d e <eos> f g h i
STREAM = [3, 4, 5, 2, 6, 7, 2, 8, 9, 10, 11]


def test_jsonl_documents_are_joined_by_eos_and_cut_into_full_chunks(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    c = load_corpora([f"toy={path}"], tok, seq_len=4)["toy"]
    assert c.chunks.dtype == torch.long
    assert c.chunks.tolist() == [[3, 4, 5, 2], [6, 7, 2, 8]]  # the tail 9 10 11 is dropped
    assert (c.n_tokens, c.n_chunks, c.seq_len, c.n_documents) == (11, 2, 4, 3)
    assert c.name == "toy" and c.path == str(path)
    c3 = load_corpora([f"toy={path}"], tok, seq_len=3)["toy"]
    assert c3.chunks.tolist() == [[3, 4, 5], [2, 6, 7], [2, 8, 9]]


def test_max_chunks_keeps_the_first_chunks(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    assert load_corpora([f"x={path}"], tok, seq_len=2, max_chunks=2)["x"].chunks.tolist() == [[3, 4], [5, 2]]
    assert load_corpora([f"x={path}"], tok, seq_len=2, max_chunks=99)["x"].n_chunks == 5  # 11 // 2


def test_plain_text_is_one_document_and_a_directory_reads_its_txt_and_jsonl_in_name_order(tmp_path, tok):
    (tmp_path / "one.txt").write_text("a b c\nd e\n", encoding="utf-8")
    got = load_corpora([f"t={tmp_path / 'one.txt'}"], tok, seq_len=5)["t"]
    assert got.chunks.tolist() == [[3, 4, 5, 6, 7]]  # no eos inside one file
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [{"text": "d e"}, {"text": ""}, {"text": "f g h i"}])  # the empty one is skipped
    (d / "a.txt").write_text("a b c", encoding="utf-8")
    (d / "manifest.json").write_text('{"text": "g g g g g g"}', encoding="utf-8")  # not a corpus file
    (d / ".hidden.txt").write_text("i i i i", encoding="utf-8")
    both = load_corpora([f"d={d}", f"t={tmp_path / 'one.txt'}"], tok, seq_len=5)
    assert list(both) == ["d", "t"]
    assert both["d"].chunks.tolist() == [STREAM[:5], STREAM[5:10]] and both["d"].n_documents == 3
    assert both["d"].n_tokens == len(STREAM) and both["t"].chunks.tolist() == [[3, 4, 5, 6, 7]]


def one_line_error(fn, *want):
    with pytest.raises(EngramError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in want), msg
    return msg


def test_every_bad_input_is_one_line_naming_the_corpus_or_option(tmp_path, tok):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": d} for d in DOCS])
    (tmp_path / "empty.txt").write_text(" \n\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "short.txt").write_text("a b c", encoding="utf-8")
    write_jsonl(tmp_path / "num.jsonl", [{"text": "a"}, {"text": 3}])
    write_jsonl(tmp_path / "other.jsonl", [{"body": "a b"}])
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "x.json").write_text("{}", encoding="utf-8")

    def load(*specs, **kw):
        return lambda: load_corpora(list(specs), tok, **{"seq_len": 2, **kw})

    one_line_error(load(f"e={tmp_path / 'empty.txt'}"), "--corpus e", "empty")
    one_line_error(load(f"m={tmp_path / 'missing.txt'}"), "--corpus m", "does not exist")
    one_line_error(load(f"l={tmp_path / 'latin1.txt'}"), "--corpus l", "not UTF-8")
    one_line_error(load(f"s={tmp_path / 'short.txt'}", seq_len=4), "--corpus s", "3 tokens", "--seq-len 4")
    one_line_error(load(f"a={good}", f"a={tmp_path / 'short.txt'}"), "--corpus a", "twice")
    one_line_error(load(str(good)), "NAME=PATH")
    one_line_error(load(f"={good}"), "NAME=PATH")
    one_line_error(load(f"g={good}", seq_len=1), "--seq-len 1", ">= 2")
    one_line_error(load(f"g={good}", max_chunks=0), "--max-chunks 0")
    one_line_error(load(f"n={tmp_path / 'num.jsonl'}"), "--corpus n", "line 2", "'text'")
    one_line_error(load(f"o={tmp_path / 'other.jsonl'}"), "--corpus o", "line 1", "'text'")
    one_line_error(load(f"b={tmp_path / 'broken.jsonl'}"), "--corpus b", "line 2", "not valid JSON")
    one_line_error(load(f"d={tmp_path / 'nodocs'}"), "--corpus d", "no .txt or .jsonl")
    one_line_error(load(), "--corpus")


def share(text, script):
    letters = [c for c in text if c.isalpha()]
    return sum(script in unicodedata.name(c, "") for c in letters) / len(letters)


LANGS = ["de", "fr", "ru", "zh_Hans"]


def test_django_catalogues_give_each_language_in_its_script_and_the_same_bytes_twice(tmp_path):
    sizes = build_corpus("django", LANGS, tmp_path / "one")
    build_corpus("django", LANGS, tmp_path / "two")
    text = {}
    for lang in LANGS:
        a, b = (tmp_path / run / f"{lang}.txt" for run in ("one", "two"))
        assert a.read_bytes() == b.read_bytes()
        text[lang] = a.read_text(encoding="utf-8")
        assert sizes[lang]["n_lines"] == len(text[lang].splitlines()) > 300
        assert sizes[lang]["n_chars"] == len(text[lang])
        assert "Project-Id-Version" not in text[lang]  # the header entry is skipped
        assert all(line.strip() for line in text[lang].splitlines())
    assert (tmp_path / "one" / "sources.json").read_bytes() == (tmp_path / "two" / "sources.json").read_bytes()
    assert share(text["ru"], "CYRILLIC") > 0.7  # the rest: %(name)s placeholders and product names
    assert share(text["zh_Hans"], "CJK") > 0.5
    assert share(text["de"], "CYRILLIC") == share(text["de"], "CJK") == 0
    assert "ü" in text["de"] and "é" in text["fr"] and "ä" not in text["fr"]
    sources = json.loads((tmp_path / "one" / "sources.json").read_text(encoding="utf-8"))
    assert sources["version"] == importlib.metadata.version("django") and "BSD-3-Clause" in sources["licence"]
    assert sources["languages"]["ru"]["from"][0] == "django/conf/locale/ru/LC_MESSAGES/django.mo"


def test_english_and_python_sources(tmp_path):
    build_corpus("english", None, tmp_path)
    build_corpus("python", None, tmp_path)
    en = (tmp_path / "en.txt").read_text(encoding="utf-8")
    py = (tmp_path / "python.txt").read_text(encoding="utf-8")
    assert share(en, "LATIN") == 1.0 and "This field is required." in en.splitlines()
    assert "class ArgumentParser(" in py and "def getsource(" in py
    assert json.loads((tmp_path / "sources.json").read_text(encoding="utf-8"))["licence"].startswith("PSF")


def test_unknown_source_or_language_lists_what_is_available(tmp_path):
    one_line_error(lambda: build_corpus("wiki", None, tmp_path), "--from 'wiki'", "django, english, python")
    one_line_error(lambda: build_corpus("django", ["de", "xx"], tmp_path), "--lang xx", "zh_Hans", "ru")
    one_line_error(lambda: build_corpus("python", ["de"], tmp_path), "--lang de", "available: python")
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_corpus_verb_writes_a_run_directory(tmp_path):
    from typer.testing import CliRunner

    from engramlab.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["corpus", "--from", "django", "--lang", "ru,zh_Hans", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["status"] == "complete"
    for lang in ("ru", "zh_Hans"):
        text = (out / f"{lang}.txt").read_text(encoding="utf-8")
        assert summary[f"{lang}.n_lines"] == len(text.splitlines()) and summary[f"{lang}.n_chars"] == len(text)
    assert not (out / "de.txt").exists()
    bad = CliRunner().invoke(app, ["corpus", "--from", "django", "--lang", "klingon", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and bad.output.startswith("error: --lang klingon") and not (tmp_path / "b").exists()
