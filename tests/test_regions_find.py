"""``find_regions`` and ``engram regions`` on a tiny model: the summary keys, region sizes, the
held-out split, perplexities against a plain loop, the model left bit-identical (also on Ctrl-C),
the run directory round trip, and every bad input as one line."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from engramlab.data.corpora import Corpus
from engramlab.errors import EngramError
from engramlab.locate.regions import find as find_mod
from engramlab.locate.regions.config import METHODS, NORMALIZE, PPL_MODES, SCOPES, RegionConfig
from engramlab.locate.regions.find import RegionResult, find_regions, split_chunks
from engramlab.locate.regions.importance import region_tensors
from engramlab.models import tiny_model, wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, N_CHUNKS = 8, 7
SMALL = dict(seq_len=SEQ, max_chunks=3, eval_chunks=2, batch_size=2, ratio=0.05)


@pytest.fixture
def lm():
    return wrap_model(tiny_model("llama", seed=0))


def corpus(name, seed, n=N_CHUNKS, vocab=64):
    g = torch.Generator().manual_seed(seed)
    chunks = torch.randint(0, vocab, (n, SEQ), generator=g)
    return Corpus(name=name, path=f"<{name}>", chunks=chunks, n_tokens=n * SEQ, n_documents=1)


def two_corpora():
    return {"de": corpus("de", 1), "fr": corpus("fr", 2)}


def state(lm):
    return ({n: p.detach().clone() for n, p in lm.model.named_parameters()},
            {n: p.requires_grad for n, p in lm.model.named_parameters()}, lm.model.training)


def assert_same_state(lm, before):
    weights, flags, training = before
    now = dict(lm.model.named_parameters())
    assert [n for n, t in weights.items() if not torch.equal(now[n].detach(), t)] == []
    assert {n: p.requires_grad for n, p in now.items()} == flags and lm.model.training == training
    assert all(p.grad is None for p in now.values())


def plain_ppl(model, chunks):
    with torch.no_grad():
        logits = model(input_ids=chunks).logits
    return math.exp(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), chunks[:, 1:].flatten())))


def test_the_config_choices_are_the_ones_the_modules_accept():
    from engramlab.locate.regions import masks
    from engramlab.models import perplexity
    from engramlab.locate.regions.importance import METHODS as IMPORTANCE_METHODS

    assert (METHODS, SCOPES, NORMALIZE, PPL_MODES) == (IMPORTANCE_METHODS, masks.SCOPES, masks.NORMALIZE,
                                                       perplexity.MODES)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_a_ratio_outside_the_open_unit_interval_is_refused(ratio):
    with pytest.raises(EngramError, match=r"RegionConfig.ratio=.* \(--ratio\)"):
        RegionConfig(ratio=ratio)


def test_split_holds_out_the_last_chunks_and_caps_the_rest():
    chunks = torch.arange(10 * 2).view(10, 2)
    imp, held = split_chunks(chunks, eval_chunks=3, max_chunks=4)
    assert imp.tolist() == chunks[:4].tolist() and held.tolist() == chunks[7:].tolist()
    imp, held = split_chunks(chunks, eval_chunks=3, max_chunks=None)
    assert imp.tolist() == chunks[:7].tolist()
    with pytest.raises(EngramError, match="--corpus x: 3 chunk"):
        split_chunks(chunks[:3], eval_chunks=3, max_chunks=None, name="x")


def test_summary_keys_sizes_and_perplexities(lm):
    corpora = two_corpora()
    reference = copy.deepcopy(lm.model)
    before = state(lm)
    res = find_regions(lm, corpora, RegionConfig(**SMALL))
    assert_same_state(lm, before)

    s = res.summary()
    per = [f"{c}.{k}" for c in corpora for k in ("ppl_base", "ppl_top", "ppl_bottom", "ppl_random", "ppl_top_ratio",
                                                  "ppl_bottom_ratio", "ppl_random_ratio", "specific_size")]
    labels = ["core", "bottom", "random", "top_de", "top_fr", "specific_de", "specific_fr"]
    overlaps = [f"overlap.{a}.{b}" for i, a in enumerate(labels) for b in labels[i + 1:]]
    without = [f"{c}.ppl_without_top_{o}{r}" for c in corpora for o in corpora for r in ("", "_ratio")]
    dims = ["dimensions.top", "dimensions.massive", "dimensions.jaccard", "dimensions.n_breaking",
            "dimensions.max_ratio", "dimensions.max_control_ratio", "super_weight"]
    assert set(s) == {*per, *overlaps, *without, *dims, "region_size", "region_fraction", "n_tensors", "n_corpora",
                      "method", "seconds"}

    params = region_tensors(lm)
    assert s["n_tensors"] == len(params) == 14  # 7 matrices x 2 layers
    for name in ("core", "bottom", "random"):
        region = res.regions[name]
        assert list(region) == list(params)
        assert all(int(region[n].sum()) == int(0.05 * p.numel()) for n, p in params.items())
    total = sum(p.numel() for p in params.values())
    assert s["region_size"] == sum(int(0.05 * p.numel()) for p in params.values())
    assert s["region_fraction"] == pytest.approx(s["region_size"] / total)
    assert s["overlap.core.bottom"] == 0.0  # top and bottom 5% of one score never meet

    # perplexity on the held-out chunks, base and with the core zeroed, by a plain loop
    for c, corp in corpora.items():
        held = corp.chunks[-2:]
        assert s[f"{c}.ppl_base"] == pytest.approx(plain_ppl(reference, held), rel=1e-5)
        zeroed = copy.deepcopy(reference)
        with torch.no_grad():
            for n, p in zeroed.named_parameters():
                if n in res.core:
                    p[res.core[n]] = 0
        assert s[f"{c}.ppl_top"] == pytest.approx(plain_ppl(zeroed, held), rel=1e-5)
        assert s[f"{c}.ppl_top_ratio"] == pytest.approx(s[f"{c}.ppl_top"] / s[f"{c}.ppl_base"])
    # each corpus's own top region zeroed (recomputed here from its importance, by hand)
    from engramlab.locate.regions.importance import importance

    de_top = {}
    for n, sc in importance(lm, corpora["de"].chunks[:3], "snip", 2).items():
        k = int(0.05 * sc.numel())
        flat = torch.zeros(sc.numel(), dtype=torch.bool)
        flat[torch.topk(sc.flatten(), k).indices] = True
        de_top[n] = flat.view(sc.shape)
    zeroed = copy.deepcopy(reference)
    with torch.no_grad():
        for n, p in zeroed.named_parameters():
            if n in de_top:
                p[de_top[n]] = 0
    assert s["fr.ppl_without_top_de"] == pytest.approx(plain_ppl(zeroed, corpora["fr"].chunks[-2:]), rel=1e-5)
    rows = res.records()
    assert [r["corpus"] for r in rows] == ["de", "fr"]
    assert [(r["importance_chunks"], r["eval_chunks"], r["n_chunks"]) for r in rows] == [(3, 2, 7)] * 2


def test_global_scope_selects_the_fraction_of_all_entries_and_the_random_region_follows_the_seed(lm):
    corpora = two_corpora()
    res = find_regions(lm, corpora, RegionConfig(**SMALL, scope="global", seed=3))
    total = sum(p.numel() for p in region_tensors(lm).values())
    for name in ("core", "bottom", "random"):
        assert sum(int(m.sum()) for m in res.regions[name].values()) == int(0.05 * total)
    again = find_regions(lm, corpora, RegionConfig(**SMALL, scope="global", seed=3)).regions["random"]
    other = find_regions(lm, corpora, RegionConfig(**SMALL, scope="global", seed=4)).regions["random"]
    assert all(torch.equal(again[n], res.regions["random"][n]) for n in again)
    assert not all(torch.equal(other[n], again[n]) for n in again)


def test_held_out_chunks_never_reach_the_importance(lm):
    cfg = RegionConfig(**SMALL, save_importance=True)
    corpora = two_corpora()
    res = find_regions(lm, corpora, cfg)
    changed = {c: copy.copy(corp) for c, corp in corpora.items()}
    for corp in changed.values():
        corp.chunks = corp.chunks.clone()
        corp.chunks[-2:] = (corp.chunks[-2:] + 7) % 64  # other held-out tokens
        corp.chunks[3:5] = (corp.chunks[3:5] + 11) % 64  # chunks past max_chunks, not held out
    res2 = find_regions(lm, changed, cfg)
    for c in corpora:
        assert all(torch.equal(res.importance[c][n], res2.importance[c][n]) for n in res.importance[c])
        assert res.summary()[f"{c}.ppl_base"] != res2.summary()[f"{c}.ppl_base"]
    assert all(torch.equal(res.core[n], res2.core[n]) for n in res.core)


def test_specific_regions_are_a_corpus_top_minus_the_others_top(lm):
    from engramlab.locate.regions.masks import top_masks

    res = find_regions(lm, two_corpora(), RegionConfig(**SMALL, specific_q=0.2, specific_p=0.05,
                                                       save_importance=True))
    top_q = {c: top_masks(res.importance[c], 0.2) for c in ("de", "fr")}
    top_p = {c: top_masks(res.importance[c], 0.05) for c in ("de", "fr")}
    for c, other in (("de", "fr"), ("fr", "de")):
        spec = res.regions[f"specific_{c}"]
        assert all(torch.equal(spec[n], top_q[c][n] & ~top_p[other][n]) for n in spec)
        assert res.summary()[f"{c}.specific_size"] == sum(int(m.sum()) for m in spec.values()) > 0


def test_one_corpus_has_no_specific_region(lm):
    res = find_regions(lm, {"de": corpus("de", 1)}, RegionConfig(**SMALL))
    assert list(res.regions) == ["core", "bottom", "random"] and res.summary()["de.specific_size"] is None


def test_ctrl_c_while_a_region_is_zeroed_leaves_the_weights_as_they_were(lm, monkeypatch):
    real, calls = find_mod.perplexity, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # the first corpus under the zeroed core
            assert any(bool((p == 0).any()) for p in region_tensors(lm).values())
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(find_mod, "perplexity", interrupted)
    before = state(lm)
    with pytest.raises(KeyboardInterrupt):
        find_regions(lm, two_corpora(), RegionConfig(**SMALL))
    assert len(calls) == 3
    assert_same_state(lm, before)


def test_save_and_load_round_trip(lm, tmp_path):
    res = find_regions(lm, two_corpora(), RegionConfig(**SMALL, save_importance=True))
    res.save(tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "records.jsonl", "corpora.jsonl", "dimensions.json", "summary.json", "overlap.json",
            "core.safetensors",
            "bottom.safetensors",
            "random.safetensors", "specific_de.safetensors", "specific_fr.safetensors",
            "importance_de.safetensors", "importance_fr.safetensors"} == names
    back = RegionResult.load(tmp_path / "run")
    assert back.summary() == res.summary() == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert back.records() == res.records() and back.overlap == res.overlap and back.config == res.config
    assert list(back.regions) == list(res.regions)
    for name, region in res.regions.items():
        assert all(torch.equal(back.regions[name][n], region[n]) for n in region)
    assert all(torch.equal(back.importance["de"][n], res.importance["de"][n]) for n in res.importance["de"])
    plain = find_regions(lm, two_corpora(), RegionConfig(**SMALL))
    plain.save(tmp_path / "plain")
    assert not list((tmp_path / "plain").glob("importance_*")) and RegionResult.load(tmp_path / "plain").importance is None


def test_bad_corpora_are_one_line_errors(lm):
    with pytest.raises(EngramError, match="--corpus de: 2 chunk.*--eval-chunks 2"):
        find_regions(lm, {"de": corpus("de", 1, n=2)}, RegionConfig(**SMALL))
    with pytest.raises(EngramError, match="--corpus de/x: a corpus name"):
        find_regions(lm, {"de/x": corpus("de", 1)}, RegionConfig(**SMALL))
    long = Corpus("de", "<de>", torch.zeros(6, 100, dtype=torch.long), 600, 1)  # the tiny model has 64 positions
    with pytest.raises(EngramError, match="--seq-len 100: longer than the model's context of 64"):
        find_regions(lm, {"de": long}, RegionConfig(**SMALL))
    with pytest.raises(EngramError, match="no corpora"):
        find_regions(lm, {}, RegionConfig(**SMALL))


# -- the verb --------------------------------------------------------------------------------------
def write_corpora(tmp_path):
    from engramlab.data.facts import load_facts

    facts = list(load_facts("country_capital_city"))
    text = [f"{f.prompt()} {f.object}." for f in facts]
    (tmp_path / "a.txt").write_text(" ".join(text), encoding="utf-8")
    (tmp_path / "b.txt").write_text(" ".join(reversed(text)), encoding="utf-8")
    (tmp_path / "short.txt").write_text(" ".join(text[:2]), encoding="utf-8")
    return tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "short.txt"


VERB = ["--seq-len", "8", "--max-chunks", "3", "--eval-chunks", "2", "--batch-size", "4", "--ratio", "0.05"]


def test_the_verb_writes_a_run_directory(tiny_hf_dir, tmp_path):
    from engramlab.cli import app

    a, b, _ = write_corpora(tmp_path)
    weights = (tiny_hf_dir / "model.safetensors").read_bytes()
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["regions", "--model", str(tiny_hf_dir), "--corpus", f"a={a}", "--corpus",
                                   f"b={b}", *VERB, "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["command"] == "regions"
    assert manifest["config"]["regions"]["ratio"] == 0.05 and manifest["config"]["regions"]["seq_len"] == 8
    summary = json.loads((out / "summary.json").read_text())
    for c in ("a", "b"):
        assert summary[f"{c}.ppl_base"] > 1 and summary[f"{c}.ppl_top_ratio"] > 0
    back = RegionResult.load(out)
    summary.pop("wall_seconds")  # the run directory's own
    assert back.summary() == summary and [r["importance_chunks"] for r in back.records()] == [3, 3]
    assert (tiny_hf_dir / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("case", ["duplicate", "ratio", "short", "model", "name", "missing"])
def test_the_verb_refuses_bad_input_in_one_line(tiny_hf_dir, tmp_path, case):
    from engramlab.cli import app

    a, b, short = write_corpora(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    model, corpora, extra = str(tiny_hf_dir), ["--corpus", f"a={a}", "--corpus", f"b={b}"], []
    want = {"duplicate": "--corpus a: the name is given twice", "ratio": "(--ratio): must be < 1",
            "short": "--corpus s:", "model": "broken", "name": "--corpus a.b: a corpus name",
            "missing": "--corpus m:"}[case]
    if case == "duplicate":
        corpora = ["--corpus", f"a={a}", "--corpus", f"a={b}"]
    elif case == "ratio":
        extra = ["--ratio", "1.5"]
    elif case == "short":
        corpora += ["--corpus", f"s={short}"]
    elif case == "model":
        model = str(tmp_path / "broken")
    elif case == "name":
        corpora = ["--corpus", f"a.b={a}"]
    elif case == "missing":
        corpora += ["--corpus", f"m={tmp_path / 'nope.txt'}"]
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["regions", "--model", model, *corpora, *VERB, *extra, "--out", str(out)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]  # besides "loading model"
    assert len(errors) == 1 and want in errors[0], res.output
    assert not out.exists()


def test_dimension_dependency_in_the_result_is_the_library_call_on_the_core_region(lm, tmp_path):
    """find_regions' dimensions.json: the same rows dimension_dependency gives on the result's
    core region and core score, and its summary keys read off those rows."""
    from engramlab.locate.regions.dimensions import dimension_dependency, massive_activations
    from engramlab.locate.regions.masks import core_scores

    corpora = two_corpora()
    res = find_regions(lm, corpora, RegionConfig(**SMALL, dimensions=3, save_importance=True))
    held = {c: corp.chunks[-2:] for c, corp in corpora.items()}
    massive = massive_activations(lm, torch.cat(list(held.values())), 2, 100.0)
    want = dimension_dependency(lm, region_tensors(lm), res.core, core_scores(res.importance, "total"), held, top=3,
                                batch_size=2, avoid=massive["dims"])
    assert json.loads(json.dumps(res.dimensions["dependency"])) == json.loads(json.dumps(want))
    s = res.summary()
    assert s["dimensions.top"] == ",".join(str(r["dim"]) for r in want) and len(want) == 3
    least = [min(r["ppl_ratio"].values()) for r in want]
    assert s["dimensions.max_ratio"] == pytest.approx(max(least))
    assert s["dimensions.n_breaking"] == sum(v >= 10 for v in least)
    res.save(tmp_path)
    assert RegionResult.load(tmp_path).summary() == s
    off = find_regions(lm, corpora, RegionConfig(**SMALL, dimensions=0))
    assert off.dimensions is None and "dimensions.top" not in off.summary()
    with pytest.raises(EngramError, match="dimension_op.*scale:C"):
        RegionConfig(dimension_op="scale:x")


def test_several_random_regions_give_the_range_of_the_control(lm):
    corpora = two_corpora()
    one = find_regions(lm, corpora, RegionConfig(**SMALL, dimensions=0)).summary()
    three = find_regions(lm, corpora, RegionConfig(**SMALL, dimensions=0, random_repeats=3)).summary()
    assert "de.ppl_random_ratio_min" not in one
    assert three["de.ppl_random_ratio"] == pytest.approx(one["de.ppl_random_ratio"])  # seed 0 is the saved one
    draws = []
    for seed in (0, 1, 2):  # each seed's random region zeroed by hand
        alone = find_regions(lm, corpora, RegionConfig(**SMALL, dimensions=0, seed=seed)).summary()
        draws.append(alone["de.ppl_random_ratio"])
    assert three["de.ppl_random_ratio_min"] == pytest.approx(min(draws))
    assert three["de.ppl_random_ratio_max"] == pytest.approx(max(draws)) and len(set(draws)) == 3
