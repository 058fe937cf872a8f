"""report.html in a real browser (headless Chromium): a study with every kind of stage, rendered
the way a reader sees it. Skipped with the reason when Chromium or Playwright is missing."""

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import chromium, needs_browser  # noqa: F401  (chromium: the module's one browser)
from engramlab.cli import app
from engramlab.report.findings import FINDINGS

pytestmark = needs_browser
MICRO = Path(__file__).parent / "data" / "study_micro.toml"

# the section every stage kind of the micro study must produce (id prefix -> why)
EXPECTED_SECTIONS = {
    "train-train": "from-scratch training: curves, hallucination, attention",
    "finetune-": "fine-tuning with and without replay",
    "patched-": "attention-patching twin",
    "evolve-evolve": "circuits over checkpoints",
    "continual-": "continual pre-training by knowledge type and frequency",
    "neurons": "knowledge neurons",
    "dkn": "degenerate knowledge neurons",
    "circuit": "the circuit",
    "recall": "recall",
    "trace": "causal tracing",
    "regions": "parameter regions",
    "freeze": "freezing a region during further training",
    "factcheck": "fact-checking with DKNs",
    "metadata": "runs and versions",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("browser") / "study"
    r = CliRunner().invoke(app, ["study", "--config", str(MICRO), "--preset", "micro", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_every_figure_is_visible_and_the_page_is_offline(study, chromium):
    seen = chromium.check(study / "report.html", reveal=".slider .frame")
    assert seen.problems() == []  # every figure loaded with a size; no console error, no script error, no request
    assert len(seen.figures) >= 20
    assert seen.findings_rows == len(FINDINGS)
    ids = [i for i, _ in seen.sections]
    for prefix, what in EXPECTED_SECTIONS.items():
        assert any(i.startswith(prefix) for i in ids), f"no section for {what} ({prefix}...) in {ids}"
    page = (study / "report.html").read_text()
    # every section in the page has its heading in the browser, and every evidence link a target
    assert len(seen.sections) == len(re.findall(r"<section id=", page))
    for target in re.findall(r'href="#([^"]+)"', page):
        assert f'id="{target}"' in page, target


def test_the_slider_shows_one_checkpoint_at_a_time(study, chromium):
    """With JavaScript the circuit slider shows one frame; the others are hidden, not gone."""
    plain = chromium.check(study / "report.html")
    revealed = chromium.check(study / "report.html", reveal=".slider .frame")
    hidden = sum(1 for f in plain.figures if f.width == 0) - sum(1 for f in revealed.figures if f.width == 0)
    frames = (study / "report.html").read_text().count('class="frame"')
    sliders = (study / "report.html").read_text().count('class="slider"')
    assert frames > sliders >= 1
    assert hidden == frames - sliders  # all but one frame per slider


def test_a_single_verb_run_gets_its_own_page(study, chromium, tmp_path):
    run = tmp_path / "circuit"
    shutil.copytree(study / "circuit-lm", run)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    seen = chromium.check(run / "report.html")
    assert seen.problems() == []
    assert [i for i, _ in seen.sections if i not in ("findings-section", "metadata")][0].startswith("circuit")
    assert seen.findings_rows == len(FINDINGS)
