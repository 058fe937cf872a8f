"""One prompt's attribution by ``NeuronConfig.method``, and the screen that lets the static score
choose where integrated gradients look.

* "ig": integrated gradients over every layer (``ig.integrated_gradients_run``): 1 + L * n passes
  for L layers and n rows per layer (the rule's points plus the alpha = 1 / alpha = 0 rows it
  lacks);
* "static": the static score (``static``), 1 pass, no completeness error (nothing is integrated);
* "screen": the unedited forward that IG starts from also gives the static score S (n_layers,
  d_mlp); the top ``screen_neurons`` neurons by S vote for their layers with their S (the sum per
  layer); the ``screen_layers`` layers with the largest sums (only layers with a vote) are
  attributed by IG, with the same steps and rule, and every other layer scores 0. That is
  1 + k * n passes for k verified layers instead of 1 + L * n. The coarse set is then taken from
  the IG scores of the verified layers as usual (every neuron of them: IG scores a whole layer in
  one backward), so refinement and interventions are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from engramlab.locate.neurons.config import NeuronConfig
from engramlab.locate.neurons.ig import clean_run, integrated_gradients_run
from engramlab.locate.neurons.static import static_from, static_scores


def screen_layers(static: torch.Tensor, n_neurons: int, n_layers: int) -> list[int]:
    """The layers to verify from static scores (n_layers, d_mlp): the top ``n_neurons`` neurons
    by score (among exactly tied scores, which ones torch.topk keeps is unspecified), each layer's
    sum of their scores, the ``n_layers`` layers with the largest positive sums, in layer order. With no positive score among the top neurons,
    the layers holding the largest scores (whatever their sign)."""
    flat = static.flatten()
    top = torch.topk(flat, min(n_neurons, flat.numel())).indices
    d_mlp = static.shape[1]
    votes: dict[int, float] = {}
    for i in top.tolist():
        if float(flat[i]) > 0:
            votes[i // d_mlp] = votes.get(i // d_mlp, 0.0) + float(flat[i])
    if not votes:
        votes = {l: float(v) for l, v in enumerate(static.max(1).values)}
    ranked = sorted(votes, key=lambda l: (-votes[l], l))
    return sorted(ranked[:n_layers])


@dataclass
class PromptAttribution:
    """scores (n_layers, d_mlp); completeness_error (None for static, or when no layer changes F);
    n_passes; layers: the layers scored (all for ig and static, the verified ones for screen)."""

    scores: torch.Tensor
    completeness_error: float | None
    n_passes: int
    layers: list[int] = field(default_factory=list)


def attribute_prompt(lm, prompt_ids: Sequence[int], target_ids: Sequence[int], config: NeuronConfig,
                     layers: Sequence[int] | None = None) -> PromptAttribution:
    """Score every neuron of ``layers`` (default all) after ``prompt_ids`` for ``target_ids`` by
    ``config.method`` (see the module docstring)."""
    prompt_ids, target_ids = list(prompt_ids), list(target_ids)
    all_layers = sorted(set(range(lm.adapter.n_layers) if layers is None else layers))
    if config.method == "static":
        run = static_scores(lm, prompt_ids, target_ids)
        scores = run.scores.clone()
        off = [l for l in range(lm.adapter.n_layers) if l not in all_layers]
        scores[off] = 0
        return PromptAttribution(scores, None, run.n_passes, all_layers)
    kwargs = dict(steps=config.steps, baseline=config.baseline, objective=config.objective, site=config.site,
                  batch_layers=config.batch_layers, rule=config.ig_rule)
    if config.method == "ig":
        run = integrated_gradients_run(lm, prompt_ids, target_ids, layers=all_layers, **kwargs)
        return PromptAttribution(run.scores, run.completeness_error(), run.n_passes, all_layers)
    clean = clean_run(lm, prompt_ids, target_ids, config.site, config.objective)
    static = static_from(lm, clean.acts, clean.final, target_ids[0])
    chosen = screen_layers(static[all_layers], config.screen_neurons, config.screen_layers)
    chosen = [all_layers[i] for i in chosen]
    run = integrated_gradients_run(lm, prompt_ids, target_ids, layers=chosen, clean=clean, **kwargs)
    return PromptAttribution(run.scores, run.completeness_error(), 1 + run.n_passes, chosen)
