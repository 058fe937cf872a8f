"""Knowledge neurons, issue 14: the static score against a direct computation written here (own
hooks, own norm and unembedding, finite differences of the direct path), the screen's layer choice
and its IG against full IG, the completeness error against F computed by hand, and the methods
through the locator and the CLI."""

import json
import math
from contextlib import contextmanager

import pytest
import torch
from typer.testing import CliRunner

import engramlab.cli.neurons  # noqa: F401  (registers the verb on app)
from engramlab.cli.common import app
from engramlab.data.facts import FactSet, load_facts
from engramlab.errors import EngramError
from engramlab.locate.neurons import NeuronConfig, find_knowledge_neurons
from engramlab.locate.neurons.ig import integrated_gradients, integrated_gradients_run
from engramlab.locate.neurons.screen import attribute_prompt, screen_layers
from engramlab.locate.neurons.static import static_scores
from engramlab.models import tiny_model, wrap_model
from engramlab.report.runs import Report, RunView
from engramlab.report.sections.neurons import render_neurons

from conftest import word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [1, 5, 3, 8, 2]
FAMILIES = ("llama", "gpt2", "gpt_neox")


# -- the model's parts, found by hand ----------------------------------------------------------------
def parts(lm):
    """(the MLP output projections, the final norm, the unembedding matrix (vocab, d_model))."""
    m = lm.model
    if lm.adapter.family == "llama":
        return [layer.mlp.down_proj for layer in m.model.layers], m.model.norm, m.lm_head.weight
    if lm.adapter.family == "gpt2":
        return [block.mlp.c_proj for block in m.transformer.h], m.transformer.ln_f, m.lm_head.weight
    return [layer.mlp.dense_4h_to_h for layer in m.gpt_neox.layers], m.gpt_neox.final_layer_norm, m.lm_head.weight


def out_rows(proj):
    """The output projection as (d_mlp, d_model): nn.Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    w = proj.weight.detach().double()
    return w if type(proj).__name__ == "Conv1D" else w.t()


def hand_norm(norm, x):
    """The final norm on x (..., d_model) in float64, written out."""
    w = norm.weight.detach().double()
    if hasattr(norm, "variance_epsilon"):  # RMSNorm
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return w * (x - mu) / torch.sqrt(var + norm.eps) + norm.bias.detach().double()


@contextmanager
def recorded(lm, ids):
    """Per layer the neuron activations at the last position (input of the output projection) and
    the input of the final norm there, from forward pre-hooks."""
    projs, norm, _ = parts(lm)
    seen = {}
    handles = [p.register_forward_pre_hook(lambda mod, args, l=l: seen.__setitem__(l, args[0][0, -1].detach()))
               for l, p in enumerate(projs)]
    handles.append(norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0][0, -1].detach())))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
        yield seen
    finally:
        for h in handles:
            h.remove()


def direct_logprob(lm, x, target):
    """log p(target) from a final residual x (d_model,) through the final norm and unembedding."""
    _, norm, w_u = parts(lm)
    logits = hand_norm(norm, x) @ w_u.detach().double().t()
    return float(torch.log_softmax(logits, -1)[target])


# -- the static score -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_static_score_is_the_direct_path_log_prob_change(family):
    lm = wrap_model(tiny_model(family, seed=0))
    target = 7
    got = static_scores(lm, PROMPT, [target, 9])  # multi-token: its first token is scored
    assert got.n_passes == 1 and got.scores.shape == (lm.adapter.n_layers, lm.adapter.d_mlp)
    projs, _, _ = parts(lm)
    with recorded(lm, PROMPT) as seen:
        x = seen["x"].double()
        eps = 1e-4
        for l, proj in enumerate(projs):
            rows = out_rows(proj)
            for n in range(lm.adapter.d_mlp):
                write = float(seen[l][n]) * rows[n]  # the neuron's write to the residual, (d_model,)
                # Removing (and doubling) a small share eps of it from the final residual, nothing
                # downstream reacting: the central difference is the first-order change of log p.
                slope = (direct_logprob(lm, x + eps * write, target) - direct_logprob(lm, x - eps * write, target)) / (2 * eps)
                assert float(got.scores[l, n]) == pytest.approx(slope, rel=1e-3, abs=1e-6 * float(got.scores.abs().max()))
        # And close to the exact direct-path ablation (Yu and Ananiadou's log-probability increase,
        # read at the final residual) when the write is small: the largest neuron decides the order.
        best = int(got.scores.flatten().abs().argmax())
        l, n = divmod(best, lm.adapter.d_mlp)
        exact = direct_logprob(lm, x, target) - direct_logprob(lm, x - float(seen[l][n]) * out_rows(projs[l])[n], target)
        assert math.copysign(1, exact) == math.copysign(1, float(got.scores[l, n]))
        assert float(got.scores[l, n]) == pytest.approx(exact, rel=0.2)


def test_static_needs_the_neurons_site():
    with pytest.raises(EngramError, match="--site"):
        NeuronConfig(method="static", site="pre")
    with pytest.raises(EngramError, match="--method"):
        NeuronConfig(method="fast")
    NeuronConfig(method="ig", site="pre")  # IG takes either site


# -- the screen ---------------------------------------------------------------------------------------
def test_screen_layers_by_the_votes_of_the_top_neurons():
    s = torch.zeros(4, 3)
    s[0] = torch.tensor([0.1, 0.1, 0.1])     # many small: outside the top 3
    s[1] = torch.tensor([0.9, 0.0, 0.0])
    s[2] = torch.tensor([0.5, 0.45, -2.0])   # two in the top 3, sum 0.95
    s[3] = torch.tensor([-1.0, 0.0, 0.2])
    assert screen_layers(s, 3, 1) == [2]
    assert screen_layers(s, 3, 2) == [1, 2]
    assert screen_layers(s, 3, 5) == [1, 2]  # only layers with a vote
    assert screen_layers(s, 1, 2) == [1]
    # No positive score at all: the layers with the largest maxima.
    assert screen_layers(-s.abs() - torch.arange(4.0)[:, None], 3, 2) == [0, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_screen_is_full_ig_on_the_layers_the_static_score_chose(family):
    lm = wrap_model(tiny_model(family, n_layers=4, seed=2))
    target = [7, 9]
    config = NeuronConfig(method="screen", steps=4, screen_layers=2, screen_neurons=10, ig_rule="midpoint")
    got = attribute_prompt(lm, PROMPT, target, config)
    static = static_scores(lm, PROMPT, target).scores
    assert got.layers == screen_layers(static, 10, 2) and len(got.layers) == 2
    full = integrated_gradients(lm, PROMPT, target, steps=4, rule="midpoint")
    off = [l for l in range(4) if l not in got.layers]
    assert torch.equal(got.scores[off], torch.zeros_like(got.scores[off]))
    scale = float(full.abs().max())
    assert float((got.scores[got.layers] - full[got.layers]).abs().max()) <= 1e-5 * scale
    # Passes: the clean forward (which also gives the static score) and, per verified layer, the
    # 4 midpoints plus the alpha = 1 and alpha = 0 rows midpoint lacks.
    assert got.n_passes == 1 + 2 * 6
    ig = attribute_prompt(lm, PROMPT, target, NeuronConfig(steps=4, ig_rule="midpoint"))
    assert ig.n_passes == 1 + 4 * 6 and ig.layers == [0, 1, 2, 3]
    assert attribute_prompt(lm, PROMPT, target, NeuronConfig(steps=4)).n_passes == 1 + 4 * 5  # right has alpha = 1
    assert attribute_prompt(lm, PROMPT, target, NeuronConfig(method="static")).n_passes == 1


# -- completeness -------------------------------------------------------------------------------------
def objective_at(lm, ids, target, layer, value):
    """The joint probability of ``target`` (teacher forced) with layer ``layer``'s neurons at the
    last prompt position set to ``value`` (None: unedited), by a pre-hook on the output projection."""
    projs, _, _ = parts(lm)
    pos = len(ids) - 1

    def put(mod, args):
        t = args[0].clone()
        if value is not None:
            t[0, pos] = value
        return (t,) + tuple(args[1:])

    handle = projs[layer].register_forward_pre_hook(put)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids + target[:-1]])).logits[0, pos:].double()
    finally:
        handle.remove()
    return math.exp(sum(float(torch.log_softmax(logits[j], -1)[t]) for j, t in enumerate(target)))


@pytest.mark.parametrize("family", FAMILIES)
def test_completeness_error_against_the_objective_by_hand(family):
    lm = wrap_model(tiny_model(family, seed=0))
    target = [7, 9]
    run = integrated_gradients_run(lm, PROMPT, target, steps=3, rule="gauss-legendre")
    gap = scale = 0.0
    for l in range(lm.adapter.n_layers):
        # F(a) - F(b) with the zero baseline: the unedited model against the layer's neurons zeroed.
        zero = torch.zeros(lm.adapter.d_mlp)
        change = objective_at(lm, PROMPT, target, l, None) - objective_at(lm, PROMPT, target, l, zero)
        assert run.f_input[l] - run.f_baseline[l] == pytest.approx(change, rel=1e-3, abs=1e-9)
        gap += abs(float(run.scores[l].double().sum()) - change)
        scale += abs(change)
    assert run.completeness_error() == pytest.approx(gap / scale, rel=1e-2, abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_completeness_error_shrinks_with_steps_and_gauss_legendre_wins(family):
    lm = wrap_model(tiny_model(family, seed=0))
    target = [7, 9]

    def error(rule, m):
        return integrated_gradients_run(lm, PROMPT, target, steps=m, rule=rule).completeness_error()

    right = [error("right", m) for m in (1, 4, 16)]
    # First order: 4x the steps, ~4x smaller (at least 3x).
    assert right[1] < right[0] / 3 and right[2] < right[1] / 3
    floor = 1e-4  # float32 rounding of F(a) - F(b) on these tiny models (~1e-6 of F ~ 3e-4)
    for m in (2, 4):
        gl, mid, r = error("gauss-legendre", m), error("midpoint", m), error("right", m)
        assert gl <= mid + floor and gl < r / 10, (m, gl, mid, r)
    # Gauss-Legendre with 4 nodes beats right with 16 steps.
    assert error("gauss-legendre", 4) < right[2]


def test_without_the_end_rows_the_scores_are_the_same_and_cheaper():
    lm = wrap_model(tiny_model("gpt2", seed=0))
    with_ends = integrated_gradients_run(lm, PROMPT, [7], steps=3, rule="gauss-legendre")
    bare = integrated_gradients_run(lm, PROMPT, [7], steps=3, rule="gauss-legendre", ends=False)
    scale = float(with_ends.scores.abs().max())
    assert float((bare.scores - with_ends.scores).abs().max()) <= 1e-6 * scale
    n_layers = lm.adapter.n_layers
    assert with_ends.n_passes == 1 + n_layers * 5 and bare.n_passes == 1 + n_layers * 3
    assert bare.completeness_error() is None and with_ends.completeness_error() is not None
    # Trapezoid has both ends of its own: nothing is added, the completeness error stays.
    trap = integrated_gradients_run(lm, PROMPT, [7], steps=3, rule="trapezoid", ends=False)
    assert trap.n_passes == 1 + n_layers * 4 and trap.completeness_error() is not None


# -- the locator and the verb -----------------------------------------------------------------------
@pytest.fixture
def word_lm():
    facts = load_facts("country_capital_city")
    tok = word_tokenizer([f.prompt(j) + " " + f.object for f in facts for j in range(len(f.templates))])
    return wrap_model(tiny_model("llama", vocab_size=len(tok), seed=0), tok), FactSet(list(facts)[:3])


def test_methods_through_the_locator(word_lm, caplog):
    lm, facts = word_lm
    common = dict(steps=2, max_rank=100000, n_compare=2, n_random_repeats=0)
    results = {m: find_knowledge_neurons(lm, facts, NeuronConfig(method=m, screen_layers=1, **common))
               for m in ("ig", "static", "screen")}
    n_layers, prompts = lm.adapter.n_layers, sum(len(f.templates) for f in facts)
    for method, result in results.items():
        summary = result.summary()
        assert summary["method"] == method
        per_prompt = {"ig": 1 + n_layers * 3, "static": 1, "screen": 1 + 1 * 3}[method]  # right, m=2: +alpha 0
        assert summary["n_passes"] == prompts * per_prompt
        for r in result.attributed():
            assert r["method"] == method and r["n_passes"] == len(r["prompts"]) * per_prompt
            assert (r["completeness_error"] is None) == (method == "static")
        if method == "screen":
            assert all(len(ls) == 1 for r in result.attributed() for ls in r["layers_scored"])
            assert all(n[0] in ls for r in result.attributed() for c, ls in zip(r["coarse"], r["layers_scored"])
                       for n in c)
    ig = results["ig"].summary()
    want = sum(r["completeness_error"] for r in results["ig"].attributed()) / len(results["ig"].attributed())
    assert ig["mean_completeness_error"] == pytest.approx(want, rel=1e-6)
    # m = 2 right steps are too few: the run says so.
    assert ig["mean_completeness_error"] > 0.05
    assert "completeness error" in caplog.text and "gauss-legendre" in caplog.text


def test_cli_method_and_rule(tmp_path, word_lm):
    lm, _ = word_lm
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    runner = CliRunner()
    res = runner.invoke(app, ["neurons", "--model", str(tmp_path / "model"), "--facts", "country_capital_city",
                              "--limit", "2", "--steps", "3", "--max-rank", "100000", "--ig-rule", "gauss-legendre",
                              "--method", "screen", "--screen-layers", "1", "--n-compare", "2",
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # Gauss-Legendre with 3 nodes lacks both ends: 3 + 2 rows for the one verified layer.
    assert summary["method"] == "screen" and summary["n_passes"] == 2 * 2 * (1 + 5)
    assert summary["mean_completeness_error"] is not None
    # The report names the method and the completeness error (and warns above the tolerance).
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for error, warned in ((0.01, False), (0.2, True)):
        view = RunView("run", tmp_path / "run", manifest, {**summary, "mean_completeness_error": error})
        (section,) = render_neurons([view], Report(tmp_path / "run", [view]))
        assert "screen: static score picks layers" in section.body and "mean IG completeness error" in section.body
        assert ("miss the sum rule" in section.body) == warned
    bad = runner.invoke(app, ["neurons", "--model", str(tmp_path / "model"), "--facts", "country_capital_city",
                              "--method", "static", "--site", "pre", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--site neurons" in bad.output
