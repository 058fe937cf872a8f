"""The report section of ``engram regions`` on a tiny real run (``find_regions`` on a tiny Llama,
saved with a manifest), and the ``core_region`` rule on hand-made summaries."""

import json
import shutil

import pytest

from engramlab.report.html import build_report
from engramlab.report.runs import Report, RunView
from engramlab.models.param_masks import mask_fractions
from engramlab.report.sections.regions import core_verdict, measured_text, ratios, render_regions, split_name

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    import torch

    from engramlab.data.corpora import Corpus
    from engramlab.locate.regions.config import RegionConfig
    from engramlab.locate.regions.find import find_regions
    from engramlab.models import tiny_model, wrap_model
    from engramlab.runs import RunDir

    def corpus(name, seed):
        chunks = torch.randint(0, 64, (6, 8), generator=torch.Generator().manual_seed(seed))
        return Corpus(name=name, path=f"<{name}>", chunks=chunks, n_tokens=48, n_documents=1)

    out = tmp_path_factory.mktemp("regions-report") / "regions"
    cfg = RegionConfig(seq_len=8, max_chunks=3, eval_chunks=2, batch_size=2, ratio=0.05, scope="global")
    with RunDir(out, "regions", {"model": "tiny", "corpus": ["de=x", "fr=y"], "regions": {"ratio": 0.05}}) as run:
        res = find_regions(wrap_model(tiny_model("llama", seed=0)), {"de": corpus("de", 1), "fr": corpus("fr", 2)},
                           cfg)
        res.save(run.path)
        run.finish(res.summary())
    return out


def view(path, **summary):
    m = json.loads((path / "manifest.json").read_text())
    s = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    return RunView(path.name, path, m, {**s, **summary})


def render(*views):
    (section,) = render_regions(list(views), Report(views[0].path, list(views)))
    return section


def test_the_section_has_its_subsection_figures_tables_and_finding(run_dir):
    sec = render(view(run_dir))
    assert sec.id == "regions" and sec.order == 100 and 'id="regions-regions"' in sec.body
    assert sec.body.count("<figure>") == 4  # perplexity bars, overlap matrix, core density, dimensions
    for text in ("held-out perplexity with a region zeroed", "overlap of the regions", "where the core region sits",
                 "Region sizes", "Settings", "specific_fr", "snip", "Dimension dependency", "Super-weight candidates"):
        assert text in sec.body, text
    assert "note" not in sec.body  # a complete run with every file
    f, dims = sec.findings
    assert dims.key == "dimension_dependency" and dims.verdict in ("not reproduced", "partly reproduced")
    assert f.key == "core_region" and f.section == "regions-regions" and f.priority == 2
    assert f.verdict == "not reproduced"  # an untrained tiny model has no 10x core
    assert f.measured.startswith("core x") and f.measured.endswith("on de, fr")


def test_core_density_counts_the_packed_mask(run_dir):
    from engramlab.locate.regions.masks import load_masks

    masks = load_masks(run_dir / "core.safetensors")
    dens = mask_fractions(run_dir / "core.safetensors")
    assert list(dens) == list(masks)
    for n, m in masks.items():
        assert dens[n] == pytest.approx(float(m.float().mean()))
    assert len(set(dens.values())) > 1  # scope=global: the share differs between matrices
    assert split_name("model.layers.11.self_attn.q_proj.weight") == (11, "self_attn.q_proj")
    assert split_name("transformer.h.0.mlp.c_proj.weight") == (0, "mlp.c_proj") and split_name("lm_head.weight") is None


def test_missing_masks_and_an_unfinished_run_give_notes(run_dir, tmp_path):
    copy = tmp_path / "regions"
    shutil.copytree(run_dir, copy)
    (copy / "core.safetensors").unlink()
    sec = render(view(copy))
    assert "No core.safetensors" in sec.body and sec.body.count("<figure>") == 3

    (copy / "core.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot be read" in render(view(copy)).body

    m = json.loads((copy / "manifest.json").read_text())
    m["status"] = "running"
    (copy / "manifest.json").write_text(json.dumps(m))
    for name in ("summary.json", "records.jsonl"):
        (copy / name).unlink()
    sec = render(view(copy))
    assert "not complete" in sec.body and "did not finish" in sec.body
    assert sec.findings == [] and "<figure>" not in sec.body


def summary(**per):
    """A summary with the given corpora's (core, bottom, random) ratios."""
    out = {}
    for c, (t, b, r) in per.items():
        out.update({f"{c}.ppl_base": 10.0, f"{c}.ppl_top_ratio": t, f"{c}.ppl_bottom_ratio": b,
                    f"{c}.ppl_random_ratio": r})
    return out


@pytest.mark.parametrize("per, verdict", [
    ({"de": (1.9e5, 1.0, 1.51), "fr": (2.3e8, 1.0, 1.2)}, "partly reproduced"),  # random 1.51x on de
    ({"de": (1.9e5, 1.0, 1.49), "fr": (2.3e8, 0.9, 1.2)}, "reproduced"),
    ({"de": (50.0, 1.0, 0.6), "fr": (20.0, 1.0, 1.0)}, "partly reproduced"),  # a 0.6 ratio is a 1.67x change
    ({"de": (1.9e5, 1.0, 1.0), "fr": (9.9, 1.0, 1.0)}, "not reproduced"),
    ({"de": (1.9e5, 1.0, 1.0)}, "inconclusive"),
    ({"de": (1.9e5, 1.0, 1.0), "fr": (None, 1.0, 1.0)}, "inconclusive"),  # fr not measured
])
def test_the_core_region_rule(per, verdict):
    assert core_verdict(ratios(summary(**per), list(per))) == verdict


def test_the_rule_on_a_real_run_with_a_replaced_summary(run_dir):
    sec = render(view(run_dir, **summary(de=(1.9e5, 1.0, 1.51), fr=(2.3e8, 1.0, 1.76))))
    f = sec.findings[0]
    assert (f.verdict, f.measured) == ("partly reproduced", "core x1.9e5-2.3e8, bottom x1.00, random x1.51-1.76 on de, fr")
    per = {"de": (12.0, 1.0, 1.0)}
    assert "needs at least two corpora" in measured_text(ratios(summary(**per), ["de", "fr"]), ["de", "fr"])


def test_the_page_is_deterministic_and_lists_the_finding(run_dir, monkeypatch):
    monkeypatch.setenv("ENGRAM_REPORT_STRICT", "1")
    page = build_report(run_dir)
    assert page == build_report(run_dir)
    assert "Parameter regions" in page and 'href="#regions-regions"' in page
    assert "not yet in engramlab" not in page.split("core region is essential")[1].split("</tr>")[0]


def _dep(dim, ratios, control):
    return {"dim": dim, "core_count": 5, "op": "zero", "param": "w", "index": [dim, 0], "value": 1.0,
            "ppl_ratio": ratios, "control_ppl_ratio": control, "control_dim": 99}


def test_the_dimension_rule_needs_every_corpus_broken_and_a_quiet_control():
    from engramlab.report.sections.dimension_regions import verdict

    quiet = {"de": 1.01, "fr": 1.0}
    assert verdict(None)[0] == "inconclusive"
    assert verdict({"dependency": [_dep(3, {"de": 1.0, "fr": 1.1}, quiet), _dep(7, {"de": 14.5, "fr": 23.7}, quiet)],
                    "massive": {"dims": [7]}})[0] == "reproduced"
    v, text = verdict({"dependency": [_dep(7, {"de": 14.5, "fr": 23.7}, {"de": 2.0, "fr": 1.0})]})
    assert v == "partly reproduced" and "dimension 7 (rank 1)" in text  # the control moved too
    assert verdict({"dependency": [_dep(7, {"de": 30.0, "fr": 1.2}, quiet)]})[0] == "not reproduced"  # one corpus only
    assert verdict({"dependency": [_dep(7, {"de": 3.0, "fr": 2.5}, quiet)]})[0] == "partly reproduced"


def test_the_language_knowledge_rule_is_a_double_dissociation():
    from engramlab.report.sections.knowledge_regions import numbers, verdict

    def summary(acc_t, acc_v, tpl_t, tpl_v, overlap=0.2, base=0.9):
        return {"accuracy.base": base, "accuracy.top_template": acc_t, "accuracy.top_value": acc_v,
                "template.ppl_without_top_template_ratio": tpl_t, "template.ppl_without_top_value_ratio": tpl_v,
                "overlap.top_template.top_value": overlap, "n_facts": 10}

    assert numbers({"de.ppl_base": 3.0}) is None and verdict(None)[0] == "inconclusive"
    assert verdict(numbers(summary(0.8, 0.1, 4.0, 1.2)))[0] == "reproduced"
    assert verdict(numbers(summary(0.8, 0.1, 4.0, 1.2, overlap=0.7)))[0] == "partly reproduced"
    assert verdict(numbers(summary(0.3, 0.1, 4.0, 1.2)))[0] == "partly reproduced"  # both regions cost the facts
    assert verdict(numbers(summary(0.8, 0.8, 1.1, 1.2)))[0] == "not reproduced"
    assert verdict(numbers(summary(0.1, 0.0, 4.0, 1.2, base=0.2)))[0] == "inconclusive"


def test_a_run_on_facts_shows_language_vs_knowledge_and_not_the_core_finding(tmp_path, one_thread):
    from engramlab.data.facts import load_facts
    from engramlab.locate.base import select
    from engramlab.locate.regions.config import RegionConfig
    from engramlab.locate.regions.find import find_regions
    from engramlab.models import tiny_model, wrap_model
    from engramlab.runs import RunDir

    from conftest import word_tokenizer

    facts = select(load_facts("country_capital_city"), limit=4)
    tok = word_tokenizer([f.prompt(j) + " " + f.object for f in facts for j in range(len(f.templates))])
    lm = wrap_model(tiny_model("llama", vocab_size=len(tok), n_layers=2, seed=0), tok)
    out = tmp_path / "regions-facts"
    with RunDir(out, "regions", {"model": "tiny", "facts": "country_capital_city", "regions": {}}) as run:
        res = find_regions(lm, facts, RegionConfig(ratio=0.05, batch_size=4))
        res.save(run.path)
        run.finish(res.summary())
    sec = render(view(out))
    assert "Language vs knowledge" in sec.body and "knowledge region (top of the answer tokens)" in sec.body
    (f,) = sec.findings
    assert f.key == "language_knowledge" and f.verdict == "inconclusive"  # an untrained model knows no facts
    assert "accuracy" in f.measured
