"""What a model predicts after a prompt: target probabilities, answer ranks, neuron edits.

The one measurement layer under every locator. For a prompt of P tokens and a target of T tokens
``t_1..t_T``, the teacher-forced input is prompt + t_1..t_{T-1}; position P - 1 + j predicts t_{j+1}:

    P(target | prompt) = prod_j P(t_j | prompt, t_<j)          ("prob")
    log P(target | prompt) = sum_j log P(t_j | prompt, t_<j)   ("logprob")
    rank(t_1) = 1 + #{v : logit_v > logit_{t_1}}  at position P - 1

``intervene`` scales MLP neurons (site ``blocks.{l}.mlp.neurons``) at the last prompt token, row by
row, while these functions run.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch

from engramlab.models.loading import pad_rows

Neuron = tuple[int, int]  # (layer, index) of an MLP neuron


def _pad_id(lm) -> int:
    # Right padding never reaches the scored positions, so any id does when there is no tokenizer.
    return lm.pad_id if lm.tokenizer is not None else 0


def encode(lm, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return [int(i) for i in prompt]



_PROMPT_END: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("prompt_end", default=None)


@contextmanager
def intervene(lm, neurons: Sequence[tuple[int, int]], factor: float, positions=-1) -> Iterator[None]:
    """Multiply the given (layer, index) ``mlp.neurons`` by ``factor`` (0 suppresses, 2 enhances).

    ``positions=-1`` is the last prompt token: inside ``target_probability(ies)``, whose input also
    holds the teacher-forced target tokens, that is where the prompt ends, row by row; elsewhere it
    is the last position. ``None`` edits every position; an int or a list is passed on as is."""
    by_layer: dict[int, list[int]] = {}
    for layer, index in neurons:
        by_layer.setdefault(int(layer), []).append(int(index))

    def edit(index: list[int]):
        def fn(t):  # (batch, pos, d_mlp)
            where = positions
            if isinstance(positions, int) and positions == -1:
                ends = _PROMPT_END.get()
                where = ends if ends is not None and ends.shape[0] == t.shape[0] else -1
            mask = torch.zeros(t.shape[1:], dtype=torch.bool, device=t.device)
            mask[:, index] = True
            if where is None:
                mask = mask.expand_as(t)
            elif isinstance(where, torch.Tensor):  # one position per row
                rows = torch.zeros_like(t, dtype=torch.bool)
                rows[torch.arange(t.shape[0], device=t.device), where.to(t.device)] = mask[0]
                mask = rows
            else:
                keep = torch.zeros(t.shape[1], 1, dtype=torch.bool, device=t.device)
                keep[where] = True
                mask = (mask & keep).expand_as(t)
            return torch.where(mask, t * factor, t)
        return fn

    with ExitStack() as stack:
        for layer, index in by_layer.items():
            stack.enter_context(lm.hooks.hook(f"blocks.{layer}.mlp.neurons", edit(index)))
        yield


def _logits_at(lm, prompts: list[list[int]], inputs: list[list[int]], wanted: list[list[int]]) -> list[torch.Tensor]:
    """One right-padded forward of ``inputs``; per row, the logits (len(wanted[i]), vocab) at the
    positions ``wanted[i]``. Only the positions some row wants go through the unembedding, and
    ``intervene(positions=-1)`` sees where each row's prompt ends."""
    ids, mask = pad_rows(inputs, _pad_id(lm), lm.device)
    keep = sorted({p for ps in wanted for p in ps})
    token = _PROMPT_END.set(torch.tensor([len(r) - 1 for r in prompts], device=lm.device))
    try:
        logits = lm.model(input_ids=ids, attention_mask=mask,
                          logits_to_keep=torch.tensor(keep, device=lm.device)).logits  # (batch, len(keep), vocab)
    finally:
        _PROMPT_END.reset(token)
    column = {p: c for c, p in enumerate(keep)}
    return [logits[i, [column[p] for p in ps]] for i, ps in enumerate(wanted)]


@torch.no_grad()
def target_probabilities(lm, prompts: Sequence[str | Sequence[int]], targets: Sequence[Sequence[int]],
                         objective: str = "prob", batch_size: int = 32) -> list[float]:
    """Teacher-forced probability of each target (the product over its tokens; "logprob": the
    sum of log-probabilities), one padded forward per batch of prompts."""
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode(lm, p) for p in prompts[start: start + batch_size]]
        tgts = [list(t) for t in targets[start: start + batch_size]]
        # Position len(prompt) - 1 + j predicts target token j.
        wanted = [list(range(len(r) - 1, len(r) - 1 + len(t))) for r, t in zip(rows, tgts)]
        for logits, t in zip(_logits_at(lm, rows, [r + t[:-1] for r, t in zip(rows, tgts)], wanted), tgts):
            total = float(logits.float().log_softmax(-1).gather(-1, torch.tensor(t, device=lm.device)[:, None]).sum())
            out.append(total if objective == "logprob" else math.exp(total))
    return out


def target_probability(lm, prompt: str | Sequence[int], target_ids: Sequence[int], objective: str = "prob") -> float:
    """Teacher-forced probability of the target tokens after ``prompt`` (product over tokens)."""
    return target_probabilities(lm, [prompt], [target_ids], objective)[0]


@torch.no_grad()
def first_token_ranks(lm, prompts: Sequence[str], targets: Sequence[Sequence[int]], batch_size: int = 32) -> list[int]:
    """Rank (1 = most likely) of each target's first token right after its prompt."""
    ranks = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode(lm, p) for p in prompts[start: start + batch_size]]
        last = _logits_at(lm, rows, rows, [[len(r) - 1] for r in rows])
        for logits, t in zip(last, targets[start: start + batch_size]):
            ranks.append(int((logits[0] > logits[0, t[0]]).sum()) + 1)
    return ranks
