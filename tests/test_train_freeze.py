"""`engram train --freeze`: a parameter region held fixed by the project's trainer, in both modes,
with weight decay and gradient clipping, across a resume."""

import pytest
import torch
from safetensors.torch import load_file

from engramlab import EngramError
from engramlab.data.world import build_world
from engramlab.models.loading import list_checkpoints
from engramlab.models.param_masks import save_masks
from engramlab.train.trainer import TrainConfig, Trainer, train

SMALL = dict(batch_size=8, eval_every=4, eval_people=6, eval_templates=1, lr=3e-3, weight_decay=0.1, grad_clip=1.0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", n_people=40, n_heldout=10)


def _region(world, tmp_path):
    """A seeded 10% of every block matrix of the fresh model, saved as engram regions does."""
    trainer = Trainer(TrainConfig(steps=1, checkpoints="none", **SMALL), world, tmp_path / "probe")
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.1 for n, p in trainer.model.named_parameters()
             if p.dim() == 2 and ".layers." in n}
    path = tmp_path / "region.safetensors"
    save_masks(path, masks)
    return path, masks


def _weights(run, step):
    return load_file(str(list_checkpoints(run)[step] / "model.safetensors"))


@pytest.mark.parametrize("mode", ["grad_mask", "restore"])
def test_frozen_entries_stay_bit_identical_while_the_rest_trains(world, tmp_path, mode):
    path, masks = _region(world, tmp_path)
    cfg = TrainConfig(steps=8, checkpoints="every:4", freeze=str(path), freeze_mode=mode, **SMALL)
    train(world, tmp_path / "run", cfg, show_progress=False)
    first, last = _weights(tmp_path / "run", 0), _weights(tmp_path / "run", 8)
    for name, m in masks.items():
        assert torch.equal(first[name][m], last[name][m]), name  # frozen: the very same bits
        assert (first[name][~m] != last[name][~m]).float().mean() > 0.5, name  # the rest moved


def test_a_frozen_run_resumes_exactly(world, tmp_path):
    path, _ = _region(world, tmp_path)
    cfg = TrainConfig(steps=8, checkpoints="every:4", freeze=str(path), **SMALL)
    train(world, tmp_path / "full", cfg, show_progress=False)
    train(world, tmp_path / "part", cfg, stop_after=5, show_progress=False)
    train(world, tmp_path / "part", cfg, resume=True, show_progress=False)
    a, b = _weights(tmp_path / "full", 8), _weights(tmp_path / "part", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_or_foreign_region_is_a_one_line_error(world, tmp_path):
    with pytest.raises(EngramError, match="--freeze .*no masks file"):
        Trainer(TrainConfig(steps=2, freeze=str(tmp_path / "none"), **SMALL), world, tmp_path / "a")
    save_masks(tmp_path / "other.safetensors", {"not.a.parameter": torch.zeros(2, 2, dtype=torch.bool)})
    with pytest.raises(EngramError, match="names no parameter"):
        Trainer(TrainConfig(steps=2, freeze=str(tmp_path / "other.safetensors"), **SMALL), world, tmp_path / "b")
