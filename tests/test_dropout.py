"""Training with dropout (TrainConfig.dropout): on only in train mode, at GPT-2's places, never in
checkpoints; dropout 0 trains bit for bit as before; resume stays exact."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.data.world import build_world
from engramlab.data.wordtok import build_word_tokenizer
from engramlab.models import tiny_model, wrap_model
from engramlab.models.loading import list_checkpoints, load_model
from engramlab.models.tiny import FAMILIES
from engramlab.train.model_configs import build_model, set_dropout
from engramlab.train.trainer import TrainConfig, Trainer, train

SMALL = dict(batch_size=8, eval_every=2, eval_people=6, eval_templates=1, lr=3e-3)
IDS = torch.tensor([[0, 5, 9, 3, 7, 11, 2, 4, 8, 6]])


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", n_people=40, n_heldout=10)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_acts_in_train_mode_only(family):
    model = tiny_model(family, seed=0)
    plain = copy.deepcopy(model)
    handles = set_dropout(model, wrap_model(model).adapter, 0.3)
    with torch.no_grad():
        model.train()
        a, b = model(IDS).logits, model(IDS).logits
        assert not torch.equal(a, b)
        model.eval()
        c, d = model(IDS).logits, model(IDS).logits
        assert torch.equal(c, d) and torch.equal(c, plain.eval()(IDS).logits)
    for h in handles:
        h.remove()
    with torch.no_grad():  # without the hooks (and p = 0) the model trains like the plain one
        set_dropout(model, wrap_model(model).adapter, 0.0)
        assert torch.equal(model.train()(IDS).logits, plain.train()(IDS).logits)


def test_llama_dropout_drops_embeddings_attention_and_mlp_outputs():
    """Hooks before and after set_dropout's see each output raw and dropped: dropped = raw * mask
    / (1 - p) with about a fraction p of zeros, independently for every module; attention
    probabilities get p through the module's attention_dropout, not the saved config."""
    p = 0.25
    model = tiny_model("llama", seed=0).train()
    adapter = wrap_model(model).adapter
    modules = {"embed": model.get_input_embeddings(), "attn": adapter.attn(0), "mlp": adapter.mlp(1)}
    raw, dropped = {}, {}
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    for name, m in modules.items():
        m.register_forward_hook(lambda mod, args, out, name=name: raw.__setitem__(name, first(out).clone()))
    set_dropout(model, adapter, p)
    for name, m in modules.items():
        m.register_forward_hook(lambda mod, args, out, name=name: dropped.__setitem__(name, first(out).clone()))
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (4, 64)))
    for name in modules:
        kept = dropped[name] != 0
        assert 0.18 < 1 - kept.float().mean() < 0.32, name
        torch.testing.assert_close(dropped[name][kept], raw[name][kept] / (1 - p))
    assert adapter.attn(0).attention_dropout == p and model.config.attention_dropout == 0.0


def test_gpt2_preset_carries_dropout_in_its_config(world, tmp_path):
    tok = build_word_tokenizer(world)
    model = build_model("tiny-gpt2", len(tok), 128, seed=0, tokenizer=tok, dropout=0.1)
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.1, 0.1, 0.1)
    trainer = Trainer(TrainConfig(steps=2, checkpoints="none", model_config="tiny-gpt2", dropout=0.2, **SMALL),
                      world, tmp_path)
    assert trainer.dropout_hooks == []  # GPT-2's own dropout modules do it
    drops = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and set(drops) == {0.2} and trainer.model.config.resid_pdrop == 0.2


def test_zero_dropout_trains_exactly_as_a_plain_model(world, tmp_path):
    """Step 1's loss equals cross-entropy of a freshly built model on the step's batch, bit for bit."""
    cfg = TrainConfig(steps=2, checkpoints="none", **SMALL)
    trainer = Trainer(cfg, world, tmp_path)
    assert trainer.dropout_hooks == []
    tok = trainer.tokenizer
    plain = build_model(cfg.model_config, len(tok), trainer._max_len(tok), cfg.seed, tok)
    batch = trainer.make_batch(0)
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=am).logits
    targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
    expected = float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100))
    assert trainer.train_step(0, batch)[0] == expected
    noisy = Trainer(TrainConfig(steps=2, checkpoints="none", dropout=0.3, **SMALL), world, tmp_path / "noisy")
    assert noisy.train_step(0, batch)[0] != expected


def test_dropout_runs_resume_exactly_and_checkpoints_load_without_dropout(world, tmp_path):
    cfg = TrainConfig(steps=4, checkpoints="every:2", dropout=0.2, **SMALL)
    train(world, tmp_path / "full", cfg, show_progress=False)
    train(world, tmp_path / "cut", cfg, stop_after=2, show_progress=False)
    train(world, tmp_path / "cut", cfg, resume=True, show_progress=False)
    for step in (2, 4):
        a = load_file(str(list_checkpoints(tmp_path / "full")[step] / "model.safetensors"))
        b = load_file(str(list_checkpoints(tmp_path / "cut")[step] / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = list_checkpoints(tmp_path / "full")[4]
    assert json.loads((ckpt / "config.json").read_text())["attention_dropout"] == 0.0
    assert json.loads((ckpt / "trainer_state.json").read_text())["config"]["dropout"] == 0.2
    lm = load_model(str(tmp_path / "full"))
    ids = lm.tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, lm.model(ids).logits)
        lm.model.train()  # no hooks travel with a checkpoint: even train mode is deterministic
        assert torch.equal(lm.model(ids).logits, lm.model(ids).logits)


def test_cli_dropout_flag_is_recorded_and_checked(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["world", "--preset", "tiny", "-N", "20", "--n-heldout", "5", "--out", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    args = ["train", "--world", str(tmp_path / "w"), "--steps", "2", "--checkpoints", "none", "--eval-every", "2",
            "--eval-people", "4", "--eval-templates", "1", "--batch-size", "4"]
    r = runner.invoke(app, [*args, "--dropout", "0.1", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["config"]["dropout"] == 0.1
    r = runner.invoke(app, [*args, "--dropout", "1.0", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "dropout" in r.output
