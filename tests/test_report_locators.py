"""The report sections of the locators (recall, neurons, dkn, circuit) on tiny real runs.

One module-scoped set of runs of the four verbs on a tiny Llama (word tokenizer over the capital
facts) is rendered; copies of them lose files, change status or summaries to reach every branch.
"""

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import word_tokenizer
from engramlab.report.html import build_report
from engramlab.report.runs import Report, RunView, collect
from engramlab.report.sections.circuit import circuit_verdict, render_circuit
from engramlab.report.sections.dkn import dkn_verdict, render_dkn
from engramlab.report.sections.locators import render_recall
from engramlab.report.sections.neurons import kn_verdict, render_neurons

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    import engramlab.cli.circuit  # noqa: F401  (registers the verbs)
    import engramlab.cli.dkn  # noqa: F401
    from engramlab.cli.common import app
    from engramlab.data.facts import load_facts
    from engramlab.models import tiny_model

    root = tmp_path_factory.mktemp("locator-report")
    facts = load_facts("country_capital_city")
    tok = word_tokenizer([f.prompt() + " " + f.object for f in facts] + [t.format(f.subject) + " " + f.object
                                                                         for f in facts for t in f.templates])
    model = tiny_model("llama", vocab_size=len(tok), seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    common = ["--model", str(root / "model"), "--facts", "country_capital_city"]
    argv = {
        "recall": ["recall", *common, "--limit", "6"],
        "neurons": ["neurons", *common, "--limit", "3", "--steps", "2", "--max-rank", "1000", "--n-compare", "20"],
        "dkn": ["dkn", *common, "--limit", "2", "--known-rank", "100000", "--steps", "2", "--threshold", "0.5",
                "--max-candidates", "6", "--methods", "persistence,pairs"],
        "circuit": ["circuit", *common, "--keep-wrong", "--top-n", "15", "--steps", "2", "--limit", "8"],
    }
    for verb, args in argv.items():
        res = CliRunner().invoke(app, args + ["--out", str(root / verb)])
        assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def sections(runs):
    """Each verb's section of its run, rendered once for the module."""
    fns = {"recall": render_recall, "neurons": render_neurons, "dkn": render_dkn, "circuit": render_circuit}
    return {verb: render(fn, view(runs / verb)) for verb, fn in fns.items()}


def view(path, name=None, **summary):
    """A RunView of ``path`` (its manifest when present) with ``summary`` entries replaced."""
    m = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
    s = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    return RunView(name or path.name, path, m, {**s, **summary})


def render(fn, *views):
    sections = fn(list(views), Report(views[0].path, list(views)))
    assert len(sections) == 1
    return sections[0]


def copy(runs, verb, tmp_path, drop=()):
    out = tmp_path / verb
    shutil.copytree(runs / verb, out)
    for name in drop:
        (out / name).unlink()
    return out


# -- the verdict rules -------------------------------------------------------------------------------------

def test_kn_suppression_rule_reaches_every_verdict():
    assert kn_verdict(0.5, 0.2, 0.1)[0] == "reproduced"
    assert kn_verdict(0.5, 0.3, 0.1)[0] == "partly reproduced"  # not twice the other relation
    assert kn_verdict(0.25, 0.05, 0.0)[0] == "partly reproduced"  # under 0.3
    assert kn_verdict(0.5, 0.1, 0.35)[0] == "partly reproduced"  # not 0.2 above random
    assert kn_verdict(0.2, 0.3, 0.1)[0] == "not reproduced"
    assert kn_verdict(None, 0.1, 0.1)[0] == "inconclusive"
    # one relation only: the other-relation control is missing, so at most "partly"
    verdict, words = kn_verdict(0.9, None, 0.01)
    assert verdict == "partly reproduced" and "other-relation control not measured" in words
    assert kn_verdict(0.01, None, 0.05)[0] == "not reproduced"
    assert kn_verdict(0.9, None, None)[0] == "inconclusive"


def test_dkn_rule_reaches_every_verdict():
    assert dkn_verdict(0.1, 10) == "reproduced"
    assert dkn_verdict(0.05, 20) == "partly reproduced"
    assert dkn_verdict(0.0, 5) == "not reproduced"
    assert dkn_verdict(None, 5) == "inconclusive" and dkn_verdict(0.0, 0) == "inconclusive"


def test_sparse_circuit_rule_reaches_every_verdict():
    assert circuit_verdict(0.85, 0.01) == "reproduced"
    assert circuit_verdict(0.85, 0.2) == "partly reproduced"  # faithful but large
    assert circuit_verdict(0.6, 0.01) == "partly reproduced"
    assert circuit_verdict(0.4, 0.01) == "not reproduced"
    assert circuit_verdict(0.4, 0.5) == "not reproduced"
    assert circuit_verdict(None, 0.01) == "inconclusive"


# -- the sections on real runs ---------------------------------------------------------------------------

def test_each_verb_has_its_section_subsection_figures_and_model(runs, sections):
    expect = {"recall": (1, None), "neurons": (2, "kn_suppression"), "dkn": (2, "dkn_partial_full"),
              "circuit": (5, "sparse_circuits")}  # drawing, curve, MIB curve, roles, lens
    for verb, (n_figures, key) in expect.items():
        s = sections[verb]
        assert s.id == verb and f'id="{verb}-{verb}"' in s.body
        assert f"{runs.name}/model" in s.body and str(runs) not in s.body  # the model is named, without the machine path
        assert s.body.count("<figure") == n_figures, verb
        assert [f.key for f in s.findings] == ([key] if key else [])
        for f in s.findings:
            assert f.section == f"{verb}-{verb}"


def test_circuit_finding_and_drawing_follow_the_run(runs, sections):
    summary = json.loads((runs / "circuit" / "summary.json").read_text())
    s = sections["circuit"]
    (f,) = s.findings
    assert f.priority == summary["n_edges_total"]
    assert f.verdict == circuit_verdict(summary["faithfulness"], summary["edge_fraction"])
    assert f"{summary['n_edges_kept']} of {summary['n_edges_total']} edges" in f.measured
    assert f"{summary['n_edges_kept']} edges kept" in s.body  # the drawing's title, from scores.safetensors


def test_several_runs_are_subsections_and_the_largest_graph_wins(runs, tmp_path):
    from engramlab.report.html import best_findings

    small, big = view(runs / "circuit", "small"), view(runs / "circuit", "big", n_edges_total=10 ** 6,
                                                       faithfulness=0.1)
    s = render(render_circuit, small, big)
    assert 'id="circuit-small"' in s.body and 'id="circuit-big"' in s.body
    best = best_findings([s])["sparse_circuits"]
    assert best.section == "circuit-big" and best.verdict == "not reproduced"


def test_dkn_found_rate_zero_is_not_reproduced_with_the_single_cluster_drop(runs):
    s = render(render_dkn, view(runs / "dkn", **{"persistence.dkn_found_rate": 0.0, "persistence.n_dkn": 0,
                                                 "persistence.mean_max_single_drop": 0.97}))
    (f,) = s.findings
    assert f.verdict == "not reproduced" and "0 of" in f.measured and "0.97" in f.measured
    s = render(render_dkn, view(runs / "dkn", **{"persistence.dkn_found_rate": 0.5, "persistence.n_dkn": 1}))
    assert s.findings[0].verdict == "reproduced" and "single cluster alone" not in s.findings[0].measured


def test_dkn_robustness_and_evolvability_tables_when_recorded(runs, sections):
    s = sections["dkn"]
    assert "Robustness" not in s.body and "Evolvability" not in s.body
    extra = {"persistence.robustness.clean.base": 0.4, "persistence.robustness.clean.attenuated": 0.1,
             "evolvability.dkn.new_top1": 0.75, "evolvability.dkn.n_neurons": 3, "evolvability.full.new_top1": 1.0}
    s = render(render_dkn, view(runs / "dkn", **extra))
    assert "Robustness" in s.body and "DKN attenuated" in s.body
    assert "Evolvability" in s.body and "<td>full</td>" in s.body and 'data-v="0.75"' in s.body


def test_missing_optional_files_give_notes(runs, tmp_path):
    c = copy(runs, "circuit", tmp_path, drop=("scores.safetensors", "components.json", "evaluation.json", "mib.json"))
    s = render(render_circuit, view(c))
    assert s.body.count("<figure") == 0
    for text in ("No scores.safetensors", "No faithfulness-vs-N curve", "No MIB CPR/CMD curve", "No head roles",
                 "No logit lens"):
        assert text in s.body
    n = copy(runs, "neurons", tmp_path, drop=("relation_neurons.json",))
    s = render(render_neurons, view(n))
    assert "relation_neurons.json is missing" in s.body and s.body.count("<figure") == 2
    d = copy(runs, "dkn", tmp_path, drop=("records.jsonl", "dkn.jsonl"))
    s = render(render_dkn, view(d))
    assert "No records.jsonl" in s.body and not s.findings


def test_an_unfinished_run_says_so(runs, sections, tmp_path):
    r = copy(runs, "recall", tmp_path)
    m = json.loads((r / "manifest.json").read_text())
    (r / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    s = render(render_recall, view(r))
    assert "status is running, not complete" in s.body
    assert "not complete" not in sections["recall"].body


def test_a_result_directory_without_manifest_renders(runs, tmp_path):
    c = copy(runs, "circuit", tmp_path, drop=("manifest.json",))
    s = render(render_circuit, view(c))
    assert f"{runs.name}/model" in s.body and s.body.count("<figure") == 5  # model from config.json


def test_pages_are_deterministic(runs, sections):
    page = build_report(runs / "circuit")
    assert page == build_report(runs / "circuit") and sections["circuit"].body in page
    assert "section failed" not in page
    assert collect(runs / "dkn").runs[0].command == "dkn"


def test_circuit_svg_is_deterministic_and_thins_to_the_strongest_edges():
    import torch

    from engramlab.locate.circuits.graph import CircuitGraph
    from engramlab.locate.circuits.prune import prune
    from engramlab.report.circuits import circuit_svg

    graph = CircuitGraph(2, 2, 2)
    scores = torch.randn(graph.n_writers, graph.n_readers, generator=torch.Generator().manual_seed(0)) * graph.valid
    kept = prune(scores, graph, "topn", n=12)
    svg = circuit_svg(scores, kept, graph, title="t")
    assert svg.startswith("<svg") and svg == circuit_svg(scores, kept, graph, title="t")
    assert f"<!-- t: {int(kept.sum())} edges kept -->" in svg  # matplotlib keeps each text as a comment
    thin = circuit_svg(scores, kept, graph, title="t", max_edges=3)
    assert "(the 3 strongest of" in thin and "strongest" not in svg
    assert "no edge kept" in circuit_svg(scores, torch.zeros_like(kept), graph)
