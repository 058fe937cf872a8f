"""``engramlab.plan``: predicted peak memory against a measured one, pass counts, budgets, knobs."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engramlab.errors import EngramError
from engramlab.locate.circuits import CircuitGraph, attribute_batch
from engramlab.locate.circuits.config import CircuitConfig
from engramlab.locate.circuits.data import batch_from_ids
from engramlab.locate.neurons.config import NeuronConfig
from engramlab.locate.neurons.ig import integrated_gradients_run
from engramlab.models import tiny_model, wrap_model
from engramlab.locate.trace.config import TraceConfig
from engramlab.locate.trace.grid import trace_grid
from engramlab.plan import Shapes, eap_passes, parse_budget, plan_circuit, plan_neurons, plan_trace, suggest

pytestmark = pytest.mark.usefixtures("one_thread")


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors created while it is on: every new storage an op
    returns is counted until it is freed (parameters and buffers of ``model`` are not new)."""

    def __init__(self, model):
        super().__init__()
        self.old = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live or key in self.old:
                continue
            self.live[key] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key, 0)


def _lm(family):
    lm = wrap_model(tiny_model(family, seed=0, vocab_size=3000, d_model=64, d_mlp=256, n_layers=4, max_pos=128))
    lm.model.requires_grad_(False)  # as load_model leaves it
    return lm


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("P,T,steps,layers,rule", [(12, 1, 10, 4, "right"), (12, 3, 10, 2, "trapezoid"),
                                                   (30, 2, 20, 1, "gauss-legendre")])
def test_ig_peak_and_passes(family, P, T, steps, layers, rule):
    lm = _lm(family)
    prompt, target = list(range(5, 5 + P)), list(range(100, 100 + T))
    with LiveBytes(lm.model) as live:
        run = integrated_gradients_run(lm, prompt, target, steps=steps, batch_layers=layers, rule=rule)
    got = plan_neurons(Shapes.from_model(lm), [(P, T)], NeuronConfig(steps=steps, batch_layers=layers, ig_rule=rule))
    assert got.n_passes == run.n_passes
    assert 0.75 <= got.activations / live.peak <= 1.25
    assert got.weights == 4 * sum(p.numel() for p in lm.model.parameters())


def _pairs(lm, b, N, P0):
    gen = torch.Generator().manual_seed(0)
    clean = [list(range(5, 5 + P0)) + torch.randint(200, 2000, (N - P0,), generator=gen).tolist() for _ in range(b)]
    corrupt = [c[:P0] + torch.randint(200, 2000, (N - P0,), generator=gen).tolist() for c in clean]
    batch = batch_from_ids(clean, corrupt, [7] * b, [8] * b, [(P0, P0 + 1)] * b, 0, lm.device,
                           [f"row {i}" for i in range(b)])
    return batch, [ids for pair in zip(clean, corrupt) for ids in pair]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("b,N,P0,steps", [(4, 12, 5, 5), (8, 20, 3, 5)])
def test_eap_ig_peak(family, b, N, P0, steps):
    lm = _lm(family)
    batch, rows = _pairs(lm, b, N, P0)
    graph = CircuitGraph.from_model(lm)
    with LiveBytes(lm.model) as live:
        attribute_batch(lm, graph, batch, "eap-ig", steps)
    got = plan_circuit(Shapes.from_model(lm), [rows], CircuitConfig(steps=steps, batch_size=b), cache_runs=False)
    assert 0.75 <= got.activations / live.peak <= 1.25


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("T,b,e,batch,samples", [(12, 2, 4, 96, 1), (20, 5, 7, 5, 2)])
def test_trace_peak_and_passes(family, T, b, e, batch, samples):
    lm = _lm(family)
    ids, noise = list(range(5, 5 + T)), torch.randn(samples, e - b, 64, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with LiveBytes(lm.model) as live:
            trace_grid(lm, ids, (b, e), 9, noise, 3, batch)
    finally:
        handle.remove()
    got = plan_trace(Shapes.from_model(lm), [(T, b)], TraceConfig(samples=samples, window=3, batch_size=batch))
    assert got.n_passes == len(calls)  # every forward of the model, prefixes included
    assert 0.75 <= got.activations / live.peak <= 1.25


def test_eap_pass_count():
    # right: m passes (the last at alpha = 1 records the clean run) + the corrupted closing forward
    # + the shared prefix; trapezoid m + 1 points; zero ablation with right: no alpha = 0 point.
    assert eap_passes("eap-ig", 5, "right", "corrupted", True) == 5 + 1 + 1
    assert eap_passes("eap-ig", 5, "trapezoid", "corrupted", False) == 6 + 1
    assert eap_passes("eap-ig", 5, "right", "zero", False) == 5 + 0 + 1
    assert eap_passes("eap-ig", 5, "midpoint", "mean", False) == 5 + 1 + 1


@pytest.mark.parametrize("text,expected", [("24GB", 24 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29),
                                           ("2g", 2 * 2**30), ("1000", 1000), (" 8 kb", 8000)])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "12XB", "-1GB", "0", "", "GB", "nanGB", "infGB"])
def test_bad_budget_is_one_line_naming_the_option(text):
    with pytest.raises(EngramError) as e:
        parse_budget(text)
    assert "--budget" in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_input(tmp_path):
    from typer.testing import CliRunner

    from engramlab.cli import app

    runner = CliRunner()
    cases = ((["--analysis", "nope"], "--analysis"), (["--analysis", "neurons", "--budget", "big"], "--budget"),
             (["--analysis", "circuit", "--set", "neurons.batch_layers=2"], "neurons.batch_layers"),
             (["--analysis", "neurons", "--set", "neurons.stepz=2"], "stepz"))
    for args, flag in cases:
        got = runner.invoke(app, ["plan", "-m", str(tmp_path), "-f", "country_capital_city", *args])
        assert got.exit_code == 2, got.output
        line = [x for x in got.output.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and flag in line[0]


def test_suggestion_lowers_the_peak_under_the_budget():
    lm = _lm("llama")
    shapes = Shapes.from_model(lm)
    config = NeuronConfig(steps=20, batch_layers=4)
    prompts = [(10, 2), (14, 1)]
    tok = _FakeTokenizer(prompts)
    base = plan_neurons(shapes, prompts, config)
    budget = base.weights + base.activations // 2
    found = suggest("neurons", shapes, tok, tok.facts, config, budget)
    assert found and found[0].changes.keys() == {"batch_layers"}
    assert found[0].plan.peak <= budget < base.peak
    assert found[0].plan.n_passes == base.n_passes  # smaller batches, the same passes
    # the largest batch that fits: one more layer per batch would not
    over = plan_neurons(shapes, prompts, NeuronConfig(steps=20, batch_layers=found[0].changes["batch_layers"] + 1))
    assert over.peak > budget
    # a budget below even one layer per batch: fewer Gauss-Legendre steps
    tight = plan_neurons(shapes, prompts, NeuronConfig(steps=20, batch_layers=1)).peak - 1
    found = suggest("neurons", shapes, tok, tok.facts, config, tight)
    assert found and found[-1].changes["ig_rule"] == "gauss-legendre" and found[-1].plan.peak <= tight


class _FakeTokenizer:
    """Prompts of given (P, T) token counts: fact i's prompt is P words, its object T words."""

    def __init__(self, prompts):
        from engramlab.data.facts import Fact, FactSet

        self.facts = FactSet([Fact(f"s{i}", "r", " ".join(["o"] * T), ("{} " + " ".join(["w"] * (P - 1)),))
                              for i, (P, T) in enumerate(prompts)])

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1] * len(text.split())}

    def decode(self, ids):
        return "x"


def test_cli_json_from_a_model_directory(tiny_hf_dir):
    """The whole path: config and tokenizer from disk (no weights read), facts tokenized, JSON out."""
    import json

    from typer.testing import CliRunner

    from engramlab.cli import app
    from engramlab.data.facts import load_facts

    got = CliRunner().invoke(app, ["plan", "-m", str(tiny_hf_dir), "--analysis", "neurons", "-f", "country_capital_city",
                                   "-n", "2", "--set", "neurons.steps=4", "--json", "--budget", "1KB"])
    assert got.exit_code == 0, got.output
    out = json.loads(got.output)
    n_prompts = sum(len(f.templates) for f in load_facts("country_capital_city")[:2])
    assert out["n_passes"] == n_prompts * (1 + 2 * (4 + 1))  # 2 layers, right rule: 4 points + alpha = 0
    assert out["fits"] is False and out["suggestions"] == []  # 1 KB: not even the weights fit
    assert out["weights_bytes"] == 4 * sum(p.numel() for p in _tiny_from(tiny_hf_dir).parameters())


def _tiny_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
