"""Training at GPU speed (engramlab.train.speed): gradient accumulation against a plain full-batch
loop, default options against a plain loop bit for bit, MFU against a hand computation, resume
with accumulation, and the options' bad values. CPU only: the CUDA pieces are no-ops here."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from engramlab import EngramError
from engramlab.cli import app
from engramlab.data.world import build_world
from engramlab.models.loading import list_checkpoints
from engramlab.runs import append_jsonl
from engramlab.train import speed
from engramlab.train.trainer import TrainConfig, Trainer, learning_rate, micro_batches, train

SMALL = dict(batch_size=8, eval_every=4, eval_people=6, eval_templates=1, lr=3e-3, checkpoints="none")


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", n_people=40, n_heldout=10)


def _plain_step(model, opt, cfg, step, batch):
    """The textbook full-batch update, written independently of the trainer: mean next-token
    cross-entropy over the attended targets, backward, clip, AdamW at the schedule's rate."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    for g in opt.param_groups:
        g["lr"] = learning_rate(cfg, step)
    logits = model(input_ids=ids, attention_mask=am).logits
    targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return float(loss.detach())


def _plain_optimizer(model, cfg):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _run_against_plain(world, tmp_path, steps=3, **kw):
    """(trainer, plain model, [(trainer loss, plain loss)]) after ``steps`` updates of both."""
    cfg = TrainConfig(steps=10, **{**SMALL, **kw})
    trainer = Trainer(cfg, world, tmp_path)
    plain = copy.deepcopy(trainer.model)
    opt = _plain_optimizer(plain, cfg)
    losses = []
    for step in range(steps):
        batch = trainer.make_batch(step)
        losses.append((trainer.train_step(step, batch)[0], _plain_step(plain, opt, cfg, step, batch)))
    return trainer, plain, losses


def test_default_options_train_bit_identically_to_a_plain_loop(world, tmp_path):
    trainer, plain, losses = _run_against_plain(world, tmp_path)
    assert all(a == b for a, b in losses)
    theirs = dict(plain.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in trainer.model.named_parameters())


def _recording_steps(optimizer, grads: list):
    """Make ``optimizer.step`` first record every parameter's gradient (clipped, as AdamW sees it)."""
    step = optimizer.step

    def recorded(*args, **kwargs):
        grads.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        return step(*args, **kwargs)

    optimizer.step = recorded


@pytest.mark.parametrize("k", [2, 3, 8])
def test_grad_accumulation_makes_the_full_batch_update(world, tmp_path, k):
    # k=3 splits 8 rows 3+3+2 and k=8 one row each: micro-batches of different token counts, so
    # a mean of micro-batch means would not be the batch's token mean.
    cfg = TrainConfig(steps=10, **{**SMALL, "grad_accum": k})
    trainer = Trainer(cfg, world, tmp_path)
    batch = trainer.make_batch(0)
    counts = [int(c[:, 1:].sum()) for c in torch.tensor_split(batch["attention_mask"], k)]
    assert len(set(counts)) > 1
    plain = copy.deepcopy(trainer.model)
    opt = _plain_optimizer(plain, cfg)
    ours, theirs = [], []
    _recording_steps(trainer.optimizer, ours)
    _recording_steps(opt, theirs)
    # The loss and the gradient AdamW receives, from the same weights, for the first update; the
    # update itself, AdamW's g / (|g| + eps) ~ sign(g), would magnify the last bits of gradients
    # near zero, so the weights after it are compared at a looser tolerance.
    loss, expected = trainer.train_step(0, batch)[0], _plain_step(plain, opt, cfg, 0, batch)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert len(ours[0]) == len(theirs[0])
    assert max(float((a - b).abs().max()) for a, b in zip(ours[0], theirs[0])) < 1e-6
    assert max(float(g.abs().max()) for g in theirs[0]) > 1e-3  # gradients big enough to tell apart
    for step in (1, 2):  # two more updates: the two stay together
        batch = trainer.make_batch(step)
        assert trainer.train_step(step, batch)[0] == pytest.approx(_plain_step(plain, opt, cfg, step, batch), rel=1e-5)
    mine = dict(trainer.model.named_parameters())
    assert max(float((p - mine[n]).detach().abs().max()) for n, p in plain.named_parameters()) < 1e-4
    assert trainer.model is not plain


def test_a_mean_of_micro_batch_means_would_be_caught(world, tmp_path):
    """The tolerance above can tell the token mean from the mean of micro-batch means."""
    trainer = Trainer(TrainConfig(steps=10, **SMALL), world, tmp_path)
    batch = trainer.make_batch(0)
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=am).logits
        targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100,
                                    reduction="none")
    token_mean = per_token.sum() / (targets != -100).sum()
    rows = torch.tensor_split(torch.arange(len(ids)), 3)
    mean_of_means = sum(per_token[r].sum() / (targets[r] != -100).sum() for r in rows) / 3
    assert abs(float(token_mean - mean_of_means)) > 1e-4


def test_micro_batches_cut_trailing_padding_and_skip_targetless_rows():
    am = torch.tensor([[1, 1, 1, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 1],
                       [1, 0, 0, 0, 0],   # one token: no target
                       [0, 0, 0, 0, 0]])
    assert micro_batches(am, 1) == [(0, 5, 5)]
    assert micro_batches(am, 2) == [(0, 3, 5)]  # rows 3-4 hold no target: left out
    assert micro_batches(am, 5) == [(0, 1, 3), (1, 2, 2), (2, 3, 5)]
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # left padding: nothing trailing to cut
    assert micro_batches(left, 2) == [(0, 1, 4), (1, 2, 4)]


def test_resume_with_grad_accumulation_is_bit_identical(world, tmp_path):
    cfg = TrainConfig(steps=6, **{**SMALL, "checkpoints": "every:2", "grad_accum": 3, "dropout": 0.1})
    train(world, tmp_path / "full", cfg, show_progress=False)
    part = tmp_path / "part"
    train(world, part, cfg, stop_after=3, show_progress=False)  # "crash" after step 3
    assert max(list_checkpoints(part)) == 2
    train(world, part, cfg, resume=True, show_progress=False)
    a = load_file(str(list_checkpoints(tmp_path / "full")[6] / "model.safetensors"))
    b = load_file(str(list_checkpoints(part)[6] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mfu_is_six_n_tokens_over_time_and_peak():
    assert speed.mfu(1_000_000, 50_000, 2.0, 0.5) == pytest.approx(6 * 1e6 * 5e4 / 2.0 / 0.5e12, rel=1e-12)
    assert speed.mfu(10, 10, 1.0, None) is None and speed.mfu(10, 10, 0.0, 1.0) is None


def test_the_peak_table_knows_the_common_boards():
    assert speed.table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.0  # SXM
    assert speed.table_peak("NVIDIA H200", "bf16") == 989.0
    assert speed.table_peak("NVIDIA H100 PCIe", "bf16") == 756.0
    assert speed.table_peak("NVIDIA H100 NVL", "bf16") == 835.0
    assert speed.table_peak("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert speed.table_peak("NVIDIA A100 80GB PCIe", "fp32") == 19.5
    assert speed.table_peak("NVIDIA L4", "bf16") == 121.0
    assert speed.table_peak("NVIDIA A10G", "bf16") is None and speed.table_peak("Tesla V100", "fp32") is None
    assert speed.peak_tflops(torch.device("cpu"), "fp32") is None
    assert speed.peak_tflops(torch.device("cpu"), "fp32", given=2.5) == 2.5


def _summary(trainer, **kw):
    append_jsonl(trainer.out / "metrics.jsonl", trainer.evaluate(0))  # one real row to analyse
    return trainer.summary(**kw)


def test_summary_reports_mfu_with_a_given_peak_and_none_on_a_plain_cpu_run(world, tmp_path):
    s = _summary(Trainer(TrainConfig(steps=4, **SMALL), world, tmp_path / "plain"), wall=2.0, tokens=100)
    assert "mfu" not in s and "peak_tflops" not in s  # a CPU without --peak-tflops: no peak, no MFU
    given = Trainer(TrainConfig(steps=4, peak_tflops=0.001, **SMALL), world, tmp_path / "given")
    s = _summary(given, wall=2.0, tokens=100, update_seconds=1.5)
    n = sum(p.numel() for p in {id(p): p for p in given.model.parameters()}.values())  # tied weights once
    assert s["peak_tflops"] == 0.001 and s["n_params"] == n
    assert s["mfu"] == pytest.approx(6 * n * 100 / 1.5 / 1e9, rel=1e-5)
    assert list(s).index("mfu") == list(s).index("n_params_non_embedding") + 2  # after the run's facts


def test_speed_pieces_are_no_ops_on_the_cpu():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    assert speed.pin(batch, torch.device("cpu"), ("input_ids",)) is batch
    assert speed.adamw_kwargs(torch.device("cpu")) == {}
    model = torch.nn.Linear(2, 2)
    assert speed.compiled(model, False) is model
    with speed.autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    with pytest.raises(EngramError, match=r"--precision.*CUDA only"):
        speed.check_precision("bf16", torch.device("cpu"))  # what device auto -> cpu meets


@pytest.mark.parametrize("flag, value, says", [
    ("--precision", "fp16", "choose one of fp32, tf32, bf16"),
    ("--precision", "bf16", "CUDA only"),
    ("--grad-accum", "0", "must be >= 1"),
    ("--grad-accum", "9", "at most batch_size (8)"),
    ("--peak-tflops", "0", "must be > 0"),
    ("--compile", None, "not with --patch-attention-from"),
])
def test_bad_speed_flags_are_one_line_errors(tmp_path, flag, value, says):
    out = tmp_path / "out"
    given = [flag, value] if value is not None else [flag, "--patch-attention-from", "RUN:4"]
    r = CliRunner().invoke(app, ["train", "--world", str(tmp_path / "no-world"), "--out", str(out),
                                 "--batch-size", "8", *given])
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1 and flag in r.output and says in r.output
    assert not out.exists()


def test_the_speed_options_are_flags_of_train():
    import typer

    command = typer.main.get_command(app).commands["train"]
    flags = {f for p in command.params for f in getattr(p, "opts", [])}
    assert {"--precision", "--compile", "--grad-accum", "--peak-tflops"} <= flags
