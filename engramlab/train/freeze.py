"""Keep a region of parameters fixed while training the rest.

``Freezer(params, masks, mode)`` holds ``params[name][masks[name]]`` at the values they have when
it is built. Call ``before_step()`` after ``loss.backward()`` (before gradient clipping) and
``after_step()`` after ``optimizer.step()``, or let ``step(optimizer)`` do the three. Two modes:

- ``"restore"``: the reference's (Zhang et al.'s region_freeze_train.py). Gradients are left as
  they are, the optimizer updates every entry, and after each step θ ← θ ⊙ ¬mask + saved. The
  optimizer's moments therefore keep accumulating the frozen entries' gradients, and those
  gradients still count in a global gradient-norm clip (which shrinks the free entries' update).
- ``"grad_mask"``: the frozen entries' gradients are zeroed before the step, so they count in
  neither the clip norm nor the moments. Zeroed gradients alone do not hold the entries: AdamW's
  decoupled weight decay (θ ← θ(1 − lr·wd)) and momentum left from earlier steps (exp_avg /
  sqrt(exp_avg_sq) is not 0 when the gradient is) still move them. So this mode restores the saved
  values after the step as well. We chose restoring over masking the update inside the optimizer
  because it is exact (bit-identical), works with any optimizer and needs no access to its
  internals; for an elementwise optimizer such as AdamW it leaves every free entry's trajectory
  the same as a masked update would.

In both modes the frozen entries are bit-identical after every ``after_step()``. Only the frozen
entries are saved (not a copy of the model). Build the freezer after the model is on its device
and after any resume: on resume the checkpoint's frozen entries already hold the saved values.
"""

from __future__ import annotations

import torch

from engramlab.errors import EngramError

MODES = ("grad_mask", "restore")


class Freezer:
    """Holds the masked entries of ``params`` fixed across optimizer steps (see the module doc)."""

    def __init__(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], mode: str = "grad_mask"):
        if mode not in MODES:
            raise EngramError(f"unknown freezing mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self._frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for name, mask in masks.items():
            if name not in params:
                raise EngramError(f"freeze mask {name!r} names no parameter: key masks by parameter name")
            p = params[name]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
                raise EngramError(f"freeze mask {name!r} must be a bool tensor of shape {tuple(p.shape)}")
            mask = mask.to(p.device)
            self._frozen.append((p, mask, p.detach()[mask].clone()))

    @property
    def n_frozen(self) -> int:
        """How many entries are held fixed."""
        return sum(saved.numel() for _, _, saved in self._frozen)

    def before_step(self) -> None:
        """After backward, before clipping and the optimizer step: zero the frozen gradients
        (``grad_mask``; nothing in ``restore`` mode)."""
        if self.mode == "grad_mask":
            with torch.no_grad():
                for p, mask, _ in self._frozen:
                    if p.grad is not None:
                        p.grad[mask] = 0

    def after_step(self) -> None:
        """After the optimizer step: write the saved values back into the frozen entries."""
        with torch.no_grad():
            for p, mask, saved in self._frozen:
                p[mask] = saved

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``before_step()``, ``optimizer.step()``, ``after_step()`` (for loops without clipping)."""
        self.before_step()
        optimizer.step()
        self.after_step()

    def intact(self) -> bool:
        """True when every frozen entry holds its saved value exactly."""
        return all(torch.equal(p.detach()[mask], saved) for p, mask, saved in self._frozen)
