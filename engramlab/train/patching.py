"""Attention patching: train a twin whose attention patterns are a reference model's.

``--patch-attention-from RUN:STEP --patch-window A:B``: during updates A..B-1 (0-based update
index; the whole run when no window is given) every layer's attention pattern
``softmax(Q K^T / sqrt(d_head) + mask)`` (B, H, T, T) is replaced by the reference model's pattern
on the same batch, computed without gradient. Q and K then get no gradient inside the window
(stop-gradient), while V, O and the MLPs learn under the reference's routing.

    patch = AttentionPatch("runs/ref:2000", (0, 500), trained=lm)
    patch.active(step)                 # is update `step` patched?
    patch.starts_at(step)              # does patching begin here after free updates?
    with patch.replacing(lm.hooks, ids, mask):
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch

from engramlab.errors import EngramError
from engramlab.models.hooks import HookPoints
from engramlab.models.loading import LoadedModel, load_model
from engramlab.train.config import parse_patch_window  # noqa: F401 (re-exported)
from engramlab.models.hooks import site_name


def patch_window(cfg) -> tuple[int, int] | None:
    """The patched updates [A, B) of a ``TrainConfig`` (None: no patching)."""
    if not cfg.patch_attention_from:
        return None
    return parse_patch_window(cfg.patch_window, cfg.steps) or (0, cfg.steps)


class AttentionPatch:
    """A reference model whose attention patterns replace the trained model's in a window of updates.

    ``reference_spec``: a model spec (``RUN:STEP``, a checkpoint directory, ...); ``window``: the
    patched updates [A, B). ``trained`` (optional): the model being trained; its layers and heads
    must match the reference's.
    """

    def __init__(self, reference_spec: str, window: tuple[int, int], *, device: str = "cpu",
                 trained: LoadedModel | None = None):
        self.spec, self.window = reference_spec, tuple(window)
        self.reference = load_model(reference_spec, device=device)
        ref = self.reference.adapter
        if trained is not None:
            t = trained.adapter
            if self.reference.model.config.to_dict().get("num_hidden_layers", ref.n_layers) != t.n_layers \
                    or ref.n_heads != t.n_heads:
                raise EngramError(f"--patch-attention-from {reference_spec}: its layers/heads "
                                  f"({ref.n_layers}x{ref.n_heads}) differ from the model being trained "
                                  f"({t.n_layers}x{t.n_heads}); use a checkpoint of the same config")
        n_layers = (trained or self.reference).adapter.n_layers
        self.sites = [site_name("attn.pattern", l) for l in range(n_layers)]

    def active(self, step: int) -> bool:
        """Whether update ``step`` (0-based) is patched: A <= step < B."""
        return self.window[0] <= step < self.window[1]

    def starts_at(self, step: int) -> bool:
        """Whether patching begins at update ``step`` after free updates (then the optimizer's
        moments, shaped by free attention, should be dropped)."""
        return step == self.window[0] and step > 0

    def patterns(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference's attention patterns on a batch: {site: (B, H, T, T)}, no gradient.

        ``ids``, ``mask``: (B, T) token ids and attention mask.
        """
        with torch.no_grad(), self.reference.hooks.capture(self.sites) as cache:
            self.reference.model(input_ids=ids, attention_mask=mask)
        return dict(cache)

    @contextmanager
    def replacing(self, hooks: HookPoints, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """Within the block, the model behind ``hooks`` uses the reference's patterns for this batch."""
        with ExitStack() as stack:
            for site, pattern in self.patterns(ids, mask).items():
                stack.enter_context(hooks.replace(site, pattern))
            yield

    def __repr__(self) -> str:
        return f"AttentionPatch({self.spec!r}, window={self.window})"
