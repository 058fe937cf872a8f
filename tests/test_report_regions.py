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
    assert sec.body.count("<figure>") == 3  # perplexity bars, overlap matrix, core density
    for text in ("held-out perplexity with a region zeroed", "overlap of the regions", "where the core region sits",
                 "Region sizes", "Settings", "specific_fr", "snip"):
        assert text in sec.body, text
    assert "note" not in sec.body  # a complete run with every file
    (f,) = sec.findings
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
    assert "No core.safetensors" in sec.body and sec.body.count("<figure>") == 2

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
    (f,) = sec.findings
    assert (f.verdict, f.measured) == ("partly reproduced", "core x1.9e5-2.3e8, bottom x1.00, random x1.51-1.76 on de, fr")
    per = {"de": (12.0, 1.0, 1.0)}
    assert "needs at least two corpora" in measured_text(ratios(summary(**per), ["de", "fr"]), ["de", "fr"])


def test_the_page_is_deterministic_and_lists_the_finding(run_dir, monkeypatch):
    monkeypatch.setenv("ENGRAM_REPORT_STRICT", "1")
    page = build_report(run_dir)
    assert page == build_report(run_dir)
    assert "Parameter regions" in page and 'href="#regions-regions"' in page
    assert "not yet in engramlab" not in page.split("core region is essential")[1].split("</tr>")[0]
