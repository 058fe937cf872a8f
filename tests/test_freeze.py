"""A frozen region stays bit-identical through AdamW steps with weight decay, in both modes."""

import pytest
import torch
import torch.nn.functional as F

from engramlab.errors import EngramError
from engramlab.models import tiny_model
from engramlab.train.freeze import Freezer

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(seed=0):
    model = tiny_model("llama", seed=seed).train()
    params = {n: p for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n}
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < 0.05 for n, p in params.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, params, masks, opt


def backward(model, step):
    ids = torch.randint(2, 64, (4, 12), generator=torch.Generator().manual_seed(100 + step))
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()


def train(model, opt, steps, first=0, freezer=None, clip=None, only_before=False):
    for step in range(first, first + steps):
        opt.zero_grad(set_to_none=True)
        backward(model, step)
        if freezer:
            freezer.before_step()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if freezer and not only_before:
            freezer.after_step()


@pytest.mark.parametrize("mode", ["grad_mask", "restore"])
def test_frozen_region_is_bit_identical_after_adamw_steps_while_the_rest_moves(mode):
    model, params, masks, opt = setup()
    train(model, opt, 3)  # moments already non-zero for the entries about to be frozen
    before = {n: p.detach().clone() for n, p in params.items()}
    freezer = Freezer(params, masks, mode)
    assert freezer.n_frozen == sum(int(m.sum()) for m in masks.values()) > 0
    train(model, opt, 5, first=3, freezer=freezer, clip=1.0)
    assert freezer.intact()
    for n, m in masks.items():
        now = params[n].detach()
        assert torch.equal(now[m], before[n][m]), n
        assert (now[~m] != before[n][~m]).float().mean() > 0.9, n  # the free entries moved


def test_zeroed_gradients_alone_do_not_hold_the_region():
    """Why grad_mask also restores: AdamW's decay and earlier momentum move zero-gradient entries."""
    model, params, masks, opt = setup()
    train(model, opt, 3)
    before = {n: p.detach().clone() for n, p in params.items()}
    freezer = Freezer(params, masks, "grad_mask")
    train(model, opt, 2, first=3, freezer=freezer, only_before=True)
    assert not freezer.intact()
    n = next(iter(masks))
    assert (params[n].detach()[masks[n]] != before[n][masks[n]]).all()


def test_restore_mode_lets_the_moments_accumulate_and_grad_mask_does_not():
    moments = {}
    for mode in ("grad_mask", "restore"):
        model, params, masks, opt = setup()
        freezer = Freezer(params, masks, mode)  # frozen from the first step: no earlier moments
        train(model, opt, 2, freezer=freezer)
        n = next(iter(masks))
        moments[mode] = opt.state[params[n]]["exp_avg"][masks[n]]
    assert (moments["grad_mask"] == 0).all()
    assert (moments["restore"] != 0).all()


def test_bad_masks_and_modes_raise():
    model, params, masks, _ = setup()
    n = next(iter(masks))
    with pytest.raises(EngramError, match="freezing mode"):
        Freezer(params, masks, "frozen")
    with pytest.raises(EngramError, match="names no parameter"):
        Freezer(params, {"nope": masks[n]})
    with pytest.raises(EngramError, match="bool tensor"):
        Freezer(params, {n: masks[n].float()})
