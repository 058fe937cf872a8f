"""The measurement layer (``engramlab.models.scoring``, ``engramlab.models.prefix``) against a plain
slow computation written here: one prompt at a time, one target token at a time, a plain
``lm.model(...)`` forward and ``log_softmax``, neuron edits by a forward hook of this file. Plus the
rule that locators take their measurements from that layer, not from each other."""

import ast
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlab.errors import EngramError
from engramlab.models import tiny_model, wrap_model
from engramlab.models.prefix import PrefixCache
from engramlab.models.scoring import (NeuronScale, answer_ranks, encode_prompts, first_token_ranks, intervene,
                                      target_logits, target_logprobs, target_probabilities, target_probability)

from conftest import word_tokenizer

ROOT = Path(__file__).resolve().parents[1] / "engramlab"
# Prompts and targets of mixed lengths (token ids of the tiny 64-token vocabulary).
PROMPTS = [[1, 5, 3, 8, 2], [4, 2], [9, 9, 9, 1, 2, 3, 4], [7]]
TARGETS = [[7, 8], [3], [5, 6, 7], [2, 11]]
NEURONS = [(0, 3), (1, 10), (1, 11)]


# -- the plain computation ------------------------------------------------------------------------
@contextmanager
def scaled_by_hand(lm, neurons, factor, position):
    """Multiply the MLP neurons (the input of each layer's MLP output projection) by ``factor`` at
    ``position`` of every row (None: at every position), with plain forward pre-hooks."""
    handles = []
    for layer in sorted({l for l, _ in neurons}):
        index = [i for l, i in neurons if l == layer]

        def pre(module, args, index=index):
            x = args[0].clone()  # (batch, pos, d_mlp)
            if position is None:
                x[:, :, index] = x[:, :, index] * factor
            else:
                x[:, position, index] = x[:, position, index] * factor
            return (x, *args[1:])

        handles.append(lm.adapter.mlp_out_proj(layer).register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def plain_logprob(lm, prompt, target, neurons=(), factor=1.0, where="prompt_end"):
    """sum_j log P(t_j | prompt, t_<j): one forward of prompt + t_<j per target token, batch 1."""
    total = 0.0
    for j in range(len(target)):
        ids = torch.tensor([list(prompt) + list(target[:j])])
        with scaled_by_hand(lm, neurons, factor, None if where == "all" else len(prompt) - 1):
            logits = lm.model(input_ids=ids).logits[0, -1]  # (vocab,)
        total += float(logits.double().log_softmax(-1)[target[j]])
    return total


def plain_rank(logits, answer):
    """1 + the number of tokens ranked before ``answer`` by a descending sort; ties go to the best."""
    order = sorted(range(len(logits)), key=lambda v: -float(logits[v]))
    return 1 + next(k for k, v in enumerate(order) if float(logits[v]) == float(logits[answer]))


# -- target log-probabilities ---------------------------------------------------------------------
def test_target_logprobs_without_edits(tiny_lm):
    got = target_logprobs(tiny_lm, PROMPTS, TARGETS, batch_size=2)  # mixed lengths: padding exercised
    assert got.shape == (len(PROMPTS),) and got.dtype == torch.float32
    want = [plain_logprob(tiny_lm, p, t) for p, t in zip(PROMPTS, TARGETS)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # Batch sizes do not change the numbers beyond float rounding; the wrappers are exp / log of it.
    assert target_logprobs(tiny_lm, PROMPTS, TARGETS, batch_size=1).tolist() == pytest.approx(want, rel=1e-5)
    assert target_probabilities(tiny_lm, PROMPTS, TARGETS, batch_size=2) == pytest.approx(
        [math.exp(v) for v in got.tolist()], rel=1e-12)
    assert target_probabilities(tiny_lm, PROMPTS, TARGETS, "logprob", batch_size=2) == pytest.approx(got.tolist())
    assert target_probability(tiny_lm, PROMPTS[2], TARGETS[2]) == pytest.approx(math.exp(want[2]), rel=1e-5)


@pytest.mark.parametrize("where", ["prompt_end", "all"])
@pytest.mark.parametrize("factor", [0.0, 2.0])
def test_target_logprobs_with_neuron_edits(tiny_lm, where, factor):
    edit = NeuronScale(NEURONS, factor, where)
    got = target_logprobs(tiny_lm, PROMPTS, TARGETS, edits=edit, batch_size=3)
    want = [plain_logprob(tiny_lm, p, t, NEURONS, factor, where) for p, t in zip(PROMPTS, TARGETS)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    clean = [plain_logprob(tiny_lm, p, t) for p, t in zip(PROMPTS, TARGETS)]
    assert all(g != pytest.approx(c, rel=1e-6) for g, c in zip(got.tolist(), clean))  # the edit does something
    assert target_probability(tiny_lm, PROMPTS[0], TARGETS[0], edits=edit) == pytest.approx(math.exp(want[0]), rel=1e-5)


def test_where_all_and_prompt_end_differ_where_they_should(tiny_lm):
    # Each matches the plain computation (above); here: "all" also edits the positions before the
    # prompt end and the target positions after it, so the two agree only when there are none.
    with torch.no_grad():
        end = target_logprobs(tiny_lm, PROMPTS[2:3], TARGETS[2:3], edits=NeuronScale(NEURONS, 0.0, "prompt_end"))
        every = target_logprobs(tiny_lm, PROMPTS[2:3], TARGETS[2:3], edits=NeuronScale(NEURONS, 0.0, "all"))
        assert end.tolist() != pytest.approx(every.tolist(), rel=1e-6)
        one = [target_logprobs(tiny_lm, [[7]], [[2]], edits=[[NeuronScale(NEURONS, 0.0, where)]]).tolist()
               for where in ("prompt_end", "all")]
    assert one[0] == pytest.approx(one[1], rel=1e-6)
    assert one[0] != pytest.approx(target_logprobs(tiny_lm, [[7]], [[2]]).tolist(), rel=1e-6)


def test_one_edit_per_row_in_one_batch(tiny_lm):
    """Rows = neuron sets: each row its own edits (None, one, or several that compose)."""
    prompts, targets = [PROMPTS[0]] * 4 + [PROMPTS[2]], [TARGETS[0]] * 4 + [TARGETS[2]]
    edits = [None, NeuronScale([(0, 3)], 0.0), [NeuronScale([(1, 10)], 2.0), NeuronScale([(1, 10)], 0.5)],
             NeuronScale(NEURONS, 2.0, "all"), NeuronScale([(0, 3), (0, 3), (1, 11)], 0.0)]
    got = target_logprobs(tiny_lm, prompts, targets, edits=edits, batch_size=5).tolist()
    want = [plain_logprob(tiny_lm, prompts[0], targets[0]),
            plain_logprob(tiny_lm, prompts[0], targets[0], [(0, 3)], 0.0),
            plain_logprob(tiny_lm, prompts[0], targets[0]),  # x2 then x0.5: back to the clean model
            plain_logprob(tiny_lm, prompts[0], targets[0], NEURONS, 2.0, "all"),
            plain_logprob(tiny_lm, prompts[4], targets[4], [(0, 3), (1, 11)], 0.0)]  # a neuron named twice: once
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(EngramError, match="one entry per prompt"):
        target_logprobs(tiny_lm, prompts, targets, edits=edits[:2])


def test_edit_and_input_errors(tiny_lm):
    with pytest.raises(EngramError, match="where"):
        NeuronScale(NEURONS, 0.0, "last")
    with pytest.raises(EngramError, match="out of range"):
        target_logprobs(tiny_lm, PROMPTS[:1], TARGETS[:1], edits=NeuronScale([(0, 10_000)], 0.0))
    with pytest.raises(EngramError, match="empty"):
        target_logprobs(tiny_lm, PROMPTS[:1], [[]])
    with pytest.raises(EngramError, match="targets"):
        target_logprobs(tiny_lm, PROMPTS, TARGETS[:2])


def test_target_logits_are_the_teacher_forced_positions(tiny_lm):
    rows = list(target_logits(tiny_lm, PROMPTS, TARGETS, batch_size=3))
    for p, t, got in zip(PROMPTS, TARGETS, rows):
        assert got.shape == (len(t), tiny_lm.adapter.vocab_size)
        with torch.no_grad():
            full = tiny_lm.model(input_ids=torch.tensor([p + t])).logits[0]  # (P + T, vocab)
        assert torch.allclose(got, full[len(p) - 1: len(p) - 1 + len(t)], atol=1e-5)


def test_target_logprobs_is_differentiable(tiny_lm):
    weight = tiny_lm.adapter.mlp_out_proj(1).weight
    weight.requires_grad_(True)
    try:
        target_logprobs(tiny_lm, PROMPTS, TARGETS).sum().backward()
        assert weight.grad is not None and float(weight.grad.abs().sum()) > 0
    finally:
        weight.grad = None


def test_intervene_is_a_plain_positioned_hook(tiny_lm):
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        with intervene(tiny_lm, NEURONS, 0.0, positions=2):
            ours = tiny_lm.model(input_ids=ids).logits
        with scaled_by_hand(tiny_lm, NEURONS, 0.0, 2):
            theirs = tiny_lm.model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-6)
    with pytest.raises(TypeError):
        intervene(tiny_lm, NEURONS, 0.0)  # no hidden default position: say where


# -- ranks --------------------------------------------------------------------------------------------
def test_answer_ranks_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],
                           [1.0, 3.0, 3.0, 0.0],
                           [1.0, 3.0, 3.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0]])
    answers = torch.tensor([1, 2, 3, 0])
    got = answer_ranks(logits, answers)
    assert got.tolist() == [plain_rank(l, a) for l, a in zip(logits, answers.tolist())] == [1, 1, 4, 1]
    assert got.dtype == torch.long


def test_first_token_ranks_against_plain_sort_with_ties():
    lm = wrap_model(tiny_model("llama", seed=3))
    with torch.no_grad():  # tokens 5 and 6 get the same unembedding row: their logits tie everywhere
        lm.adapter.model.lm_head.weight[6] = lm.adapter.model.lm_head.weight[5]
    prompts = PROMPTS + PROMPTS
    targets = [[5, 1]] * len(PROMPTS) + [[6]] * len(PROMPTS)
    got = first_token_ranks(lm, prompts, targets, batch_size=3)
    want = []
    for p, t in zip(prompts, targets):
        with torch.no_grad():
            last = lm.model(input_ids=torch.tensor([p])).logits[0, -1]
        want.append(plain_rank(last, t[0]))
    assert got == want
    assert got[:len(PROMPTS)] == got[len(PROMPTS):]  # tied tokens share their (best) rank


# -- the shared prefix ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "mistral"])
def test_prefix_cache_matches_no_cache(family):
    # mistral's sliding window (4) is shorter than these prompts: the cache must mask as HF does.
    lm = wrap_model(tiny_model(family, seed=1))
    head = [3, 1, 4, 1, 5, 9, 2]
    prompts = [head + [6], head + [6], head + [5], head + [3, 5]]
    targets = [[8, 9, 7], [8], [2, 6], [1]]
    edits = [None, NeuronScale(NEURONS, 0.0), NeuronScale([(1, 4)], 2.0), NeuronScale(NEURONS, 0.0)]
    prefix = PrefixCache.run(lm, head)
    assert prefix.length == len(head) == prefix.get_seq_length()
    cached = target_logprobs(lm, prompts, targets, edits=edits, prefix=prefix, batch_size=3)
    plain = [plain_logprob(lm, p, t, *(() if e is None else (e.neurons, e.factor))) for p, t, e in
             zip(prompts, targets, edits)]
    assert cached.tolist() == pytest.approx(plain, rel=1e-5)
    assert cached.tolist() == pytest.approx(target_logprobs(lm, prompts, targets, edits=edits).tolist(), rel=1e-5)
    # It stores nothing: reused with other batch sizes it gives the same numbers, and keeps its length.
    again = target_logprobs(lm, prompts, targets, edits=edits, prefix=prefix, batch_size=1)
    assert again.tolist() == pytest.approx(cached.tolist(), rel=1e-6)
    assert prefix.get_seq_length() == len(head)


def test_prefix_cache_errors(tiny_lm):
    prefix = PrefixCache.run(tiny_lm, [3, 1, 4])
    with pytest.raises(EngramError, match="where='all'"):
        target_logprobs(tiny_lm, [[3, 1, 4, 1]], [[5]], edits=NeuronScale(NEURONS, 0.0, "all"), prefix=prefix)
    with pytest.raises(EngramError, match="does not continue"):
        target_logprobs(tiny_lm, [[3, 1, 5, 1]], [[5]], prefix=prefix)
    with pytest.raises(EngramError, match="does not continue"):
        target_logprobs(tiny_lm, [[3, 1, 4]], [[5]], prefix=prefix)  # nothing left after the prefix
    with pytest.raises(EngramError, match="at least one token"):
        PrefixCache.run(tiny_lm, [])
    with pytest.raises(EngramError, match="cannot be changed"):
        prefix.batch_repeat_interleave(2)


def test_suppression_reuses_one_prefix_with_the_same_numbers():
    from engramlab.locate.dkn.suppression import prompt_prefix, scaled_target_probs

    tok = word_tokenizer(["the capital of france is paris city"])
    lm = wrap_model(tiny_model("llama", vocab_size=len(tok), n_layers=3, seed=1), tok)
    prompt, target = "the capital of france is", tok.convert_tokens_to_ids(["paris", "city"])
    sets = [[], [(0, 3)], [(1, 5), (2, 7), (0, 1)]]
    fresh = scaled_target_probs(lm, prompt, target, sets, 0.0, "last", batch_size=2)
    prefix = prompt_prefix(lm, encode_prompts(lm, [prompt])[0])
    for _ in range(2):
        assert np.array_equal(scaled_target_probs(lm, prompt, target, sets, 0.0, "last", batch_size=2, prefix=prefix),
                              fresh)
    assert prompt_prefix(lm, [5], "last") is None and prompt_prefix(lm, [5, 6], "all") is None
    want = [math.exp(plain_logprob(lm, encode_prompts(lm, [prompt])[0], target, s, 0.0)) for s in sets]
    assert fresh.tolist() == pytest.approx(want, rel=1e-5)


def test_evolvability_loss_and_recall_against_plain_cross_entropy():
    from engramlab.data.facts import Fact
    from engramlab.locate.dkn.evolvability import _batch, _loss, _recall

    tok = word_tokenizer(["the capital of france is paris city", "alpha beta gamma delta"])
    lm = wrap_model(tiny_model("llama", vocab_size=len(tok), seed=2), tok)
    facts = [Fact("france", "capital", "paris city", ("the capital of {} is",)),
             Fact("alpha", "test_relation", "gamma", ("{} beta delta",))]
    batch = _batch(lm, facts, 0)
    losses, first = [], []
    for prompt, target in zip(*batch):
        losses.append(-plain_logprob(lm, prompt, target) / len(target))
        with torch.no_grad():
            first.append(lm.model(input_ids=torch.tensor([prompt])).logits[0, -1].softmax(-1))
    assert float(_loss(lm, batch).detach()) == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    recall = _recall(lm, batch)
    top1 = [float(int(p.argmax()) == t[0]) for p, t in zip(first, batch[1])]
    assert recall["top1"] == sum(top1) / len(top1)
    assert recall["mean_prob"] == pytest.approx(sum(float(p[t[0]]) for p, t in zip(first, batch[1])) / 2, rel=1e-5)


# -- locators measure through the scoring layer, not through each other --------------------------------
# (module files, packages they must not import). DKN candidates are coarse knowledge neurons by
# definition, so locate/dkn may use the knowledge-neuron attribution and selection (and the names
# of its choices, in the light ``config``).
FORBIDDEN = [
    ("locate/circuits", ("engramlab.locate.neurons", "engramlab.locate.dkn")),
    ("locate/neurons", ("engramlab.locate.dkn", "engramlab.locate.circuits")),
    ("recall.py", ("engramlab.locate.neurons", "engramlab.locate.dkn", "engramlab.locate.circuits")),
]
DKN_MAY_USE = ("engramlab.locate.neurons.ig", "engramlab.locate.neurons.select", "engramlab.locate.neurons.config")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (``from a import b``: a and a.b)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_locators_do_not_borrow_each_others_measurements():
    bad = []
    for where, forbidden in FORBIDDEN:
        target = ROOT / where
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        assert files, where
        for path in files:
            for module in imported_modules(path):
                if any(_within(module, f) for f in forbidden):
                    bad.append(f"{path.relative_to(ROOT.parent)} imports {module}")
    for path in sorted((ROOT / "locate/dkn").rglob("*.py")):
        for module in imported_modules(path):
            if _within(module, "engramlab.locate.circuits") or (
                    _within(module, "engramlab.locate.neurons") and module != "engramlab.locate.neurons"
                    and not any(_within(module, m) for m in DKN_MAY_USE)):
                bad.append(f"{path.relative_to(ROOT.parent)} imports {module}")
            elif module == "engramlab.locate.neurons":  # the package face pulls in the whole locator
                bad.append(f"{path.relative_to(ROOT.parent)} imports {module} (use .ig or .select)")
    assert not bad, "measure through engramlab.models.scoring instead:\n" + "\n".join(bad)


def test_the_import_scan_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from engramlab.locate.neurons import first_token_ranks\n")
    assert "engramlab.locate.neurons.first_token_ranks" in imported_modules(f)
    assert _within("engramlab.locate.neurons.first_token_ranks", "engramlab.locate.neurons")
