"""What a model predicts after a prompt: target log-probabilities, answer ranks, neuron edits.

The one measurement layer under every locator. For a prompt of P tokens and a target of T tokens
``t_1..t_T``, the teacher-forced input is prompt + t_1..t_{T-1} (P + T - 1 tokens); position
P - 1 + j predicts t_{j+1}:

    log P(target | prompt) = sum_j log P(t_j | prompt, t_<j)        (``target_logprobs``)
    P(target | prompt)     = exp of that                            (``target_probabilities``)
    rank(a)                = 1 + #{v : logit_v > logit_a}            (``answer_ranks``; ties share
                                                                     the best rank)

1. ``encode`` / ``encode_prompts``: prompts as token ids, no special tokens (the LRE convention:
   prompts are scored exactly as written; a BOS would shift every position).
2. ``target_logits``: per row the logits (T_i, vocab) at the positions that predict the target,
   from one right-padded forward per batch; only those positions go through the unembedding.
   ``target_logprobs`` sums their log-probabilities, ``first_token_ranks`` ranks the first token.
3. ``NeuronScale(neurons, factor, where)``: an explicit edit of MLP neurons (site
   ``blocks.{l}.mlp.neurons``), x factor at each row's last prompt token (``"prompt_end"``) or at
   every position (``"all"``). Every scorer takes ``edits=``: one edit for every row, or one entry
   per row, so one forward pass can score many neuron sets (the DKN search does).
4. ``prefix=``: a ``engramlab.models.prefix.PrefixCache`` of a prefix every prompt starts with;
   then only the rest of each row runs (see that module).

Every function runs under the caller's grad mode (the evolvability fine-tuning differentiates
``target_logprobs``) except the float-returning wrappers, which run without gradients.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence, Union

import torch

from engramlab.errors import EngramError
from engramlab.models.hooks import site_name
from engramlab.models.loading import pad_rows

if TYPE_CHECKING:
    from engramlab.models.prefix import PrefixCache

Neuron = tuple[int, int]  # (layer, index) of an MLP neuron
WHERE = ("prompt_end", "all")
Prompt = Union[str, Sequence[int]]


# -- prompts as token ids ---------------------------------------------------------------------------
def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as written: no special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(lm, prompt: Prompt) -> list[int]:
    """One prompt as token ids: a string is tokenized (``text_ids``), ids are taken as they are."""
    if isinstance(prompt, str):
        return text_ids(lm.tokenizer, prompt)
    return [int(i) for i in prompt]


def encode_prompts(lm, prompts: Sequence[Prompt]) -> list[list[int]]:
    """``encode`` for each prompt. (``lm.encode`` gives the same rows right-padded as tensors.)"""
    return [encode(lm, p) for p in prompts]


def _pad_id(lm) -> int:
    # Right padding never reaches the scored positions, so any id does when there is no tokenizer.
    return lm.pad_id if lm.tokenizer is not None else 0


# -- neuron edits -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeuronScale:
    """Multiply MLP neurons by ``factor`` (0 suppresses, 2 enhances) while a row is scored.

    ``neurons`` (layer, index) pairs, a set (a neuron named twice is scaled once); ``where``:
    "prompt_end" the row's last prompt token only (teacher-forced target positions come after
    it), "all" every position of the row. Several edits on one row compose (factors multiply)."""

    neurons: tuple[Neuron, ...]
    factor: float
    where: str = "prompt_end"

    def __post_init__(self):
        if self.where not in WHERE:
            raise EngramError(f"NeuronScale.where={self.where!r}: choose one of {', '.join(WHERE)}")
        neurons = tuple(sorted({(int(l), int(i)) for l, i in self.neurons}))
        object.__setattr__(self, "neurons", neurons)
        object.__setattr__(self, "factor", float(self.factor))

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, index in self.neurons:
            out.setdefault(layer, []).append(index)
        return out


RowEdits = Union[NeuronScale, Sequence[Union[NeuronScale, Sequence[NeuronScale], None]]]


def row_edits(edits: RowEdits, n: int) -> list[tuple[NeuronScale, ...]]:
    """``edits`` as one tuple of edits per row: a single ``NeuronScale`` applies to all ``n`` rows;
    a sequence has one entry per row (an edit, a list of edits, or None); empty means none."""
    if isinstance(edits, NeuronScale):
        return [(edits,)] * n
    edits = list(edits)
    if not edits:
        return [()] * n
    if len(edits) != n:
        raise EngramError(f"edits: {len(edits)} entries for {n} prompts; give one entry per prompt (a NeuronScale, "
                          "a list of them, or None) or a single NeuronScale for every prompt")
    return [() if e is None else (e,) if isinstance(e, NeuronScale) else tuple(e) for e in edits]


@contextmanager
def apply_edits(lm, edits: Sequence[Sequence[NeuronScale]], ends: torch.Tensor) -> Iterator[None]:
    """Hooks that apply ``edits[r]`` to row r of every forward pass inside the block.

    ``ends`` (rows,) is each row's last prompt position in the input (for "prompt_end"). Per layer
    and ``where`` one factor table s (rows, d_mlp), 1 where nothing is edited, and the site becomes
    t * s[:, None, :] at the selected positions: one forward pass serves rows with different edits."""
    rows, d_mlp, n_layers = len(edits), lm.adapter.d_mlp, lm.adapter.n_layers
    scales: dict[tuple[int, str], torch.Tensor] = {}
    for r, mine in enumerate(edits):
        for edit in mine:
            for layer, index in edit.by_layer().items():
                if not 0 <= layer < n_layers or not all(0 <= i < d_mlp for i in index):
                    raise EngramError(f"NeuronScale neuron out of range in layer {layer}: the model has {n_layers} "
                                      f"layers of {d_mlp} neurons")
                s = scales.get((layer, edit.where))
                if s is None:
                    s = scales[(layer, edit.where)] = torch.ones(rows, d_mlp, dtype=lm.dtype, device=lm.device)
                s[r, index] *= edit.factor
    with ExitStack() as stack:
        for (layer, where), s in sorted(scales.items()):
            stack.enter_context(lm.hooks.edit(site_name("mlp.neurons", layer), lambda t, s=s: t * s[:, None, :],
                                              positions=None if where == "all" else ends))
        yield


@contextmanager
def intervene(lm, neurons: Sequence[Neuron], factor: float, *, positions) -> Iterator[None]:
    """Multiply the (layer, index) neurons by ``factor`` at ``positions`` of every forward pass
    inside the block (``HookPoints`` positions: an int, a list, a slice, a (batch,) tensor, or None
    for all). To edit at each row's prompt end while scoring, pass ``edits=NeuronScale(...)``."""
    with ExitStack() as stack:
        for layer, index in NeuronScale(neurons, factor).by_layer().items():
            stack.enter_context(lm.hooks.scale(site_name("mlp.neurons", layer), factor, positions, index))
        yield


# -- teacher-forced logits and what is read from them ----------------------------------------------
def target_logits(lm, prompts: Sequence[Prompt], targets: Sequence[Sequence[int]], *, edits: RowEdits = (),
                  prefix: "PrefixCache | None" = None, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Per row, the logits (T_i, vocab) at the positions predicting target i's tokens, in order.

    One right-padded forward per ``batch_size`` rows of prompt_i + target_i[:-1]. With ``prefix``
    every prompt must start with ``prefix.ids``; only the rest runs, on the shared keys/values (so
    "all" edits cannot be used: the prefix ran unedited). A generator: each batch runs when its
    first row is asked for."""
    n = len(prompts)
    if len(targets) != n:
        raise EngramError(f"{n} prompts but {len(targets)} targets; give one target per prompt")
    per_row = row_edits(edits, n)
    past = 0 if prefix is None else prefix.length
    if prefix is not None and any(e.where == "all" for mine in per_row for e in mine):
        raise EngramError("NeuronScale(where='all') edits the prompt prefix, which a PrefixCache ran unedited; "
                          "score without prefix= (or edit at the prompt end)")
    for start in range(0, n, batch_size):
        rows = encode_prompts(lm, prompts[start:start + batch_size])
        tgts = [[int(t) for t in ts] for ts in targets[start:start + batch_size]]
        for k, (r, t) in enumerate(zip(rows, tgts), start):
            if not t:
                raise EngramError(f"target {k} is empty; every target needs at least one token")
            if len(r) <= past or (prefix is not None and tuple(r[:past]) != prefix.ids):
                raise EngramError(f"prompt {k} does not continue the PrefixCache's {past} tokens; build the cache "
                                  "from a prefix every prompt starts with and is longer than")
        inputs = [r[past:] + t[:-1] for r, t in zip(rows, tgts)]
        ends = [len(r) - past - 1 for r in rows]  # where each row's prompt ends: it predicts t_1
        ids, mask = pad_rows(inputs, _pad_id(lm), lm.device)  # (b, S), S the longest row
        if prefix is not None:
            mask = torch.cat([mask.new_ones(len(rows), past), mask], dim=1)  # (b, past + S)
        width = ids.shape[1]
        # Every row wants the same last T positions (rows of one prompt, one row): unembed a slice;
        # otherwise gather the wanted positions. (The two round differently in the last bits for
        # batches > 1, so each caller keeps the numbers it always had.)
        if all(e + len(t) == width for e, t in zip(ends, tgts)) and len({len(t) for t in tgts}) == 1:
            keep, columns = len(tgts[0]), None
        else:
            wanted = sorted({p for e, t in zip(ends, tgts) for p in range(e, e + len(t))})
            keep, column = torch.tensor(wanted, device=lm.device), {p: c for c, p in enumerate(wanted)}
            columns = [[column[p] for p in range(e, e + len(t))] for e, t in zip(ends, tgts)]
        with apply_edits(lm, per_row[start:start + batch_size], torch.tensor(ends, device=lm.device)):
            logits = lm.model(input_ids=ids, attention_mask=mask, cache=prefix, use_cache=prefix is not None,
                              logits_to_keep=keep).logits  # (b, T or len(wanted), vocab)
        for i in range(len(rows)):
            yield logits[i] if columns is None else logits[i, columns[i]]


def token_logprobs(logits: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """log P(t_j | ...) = log softmax(logits[..., j, :])[t_j] for logits (..., T, vocab), position j
    predicting target token j: (..., T) float32 (with gradients when the logits have them)."""
    t = torch.as_tensor(list(target), device=logits.device)
    return logits.float().log_softmax(-1).gather(-1, t.expand(logits.shape[:-1]).unsqueeze(-1))[..., 0]


def _logprob(logits: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """sum_j log P(t_j | prompt, t_<j) for logits (T, vocab): a scalar, float32."""
    return token_logprobs(logits, target).sum()


def target_logprobs(lm, prompts: Sequence[Prompt], targets: Sequence[Sequence[int]], *, edits: RowEdits = (),
                    prefix: "PrefixCache | None" = None, batch_size: int = 32) -> torch.Tensor:
    """log P(target_i | prompt_i) = sum_j log P(t_j | prompt_i, t_<j), (n,) float32 on the model's
    device (see ``target_logits`` for ``edits``, ``prefix`` and batching)."""
    out = [_logprob(logits, t) for logits, t in
           zip(target_logits(lm, prompts, targets, edits=edits, prefix=prefix, batch_size=batch_size), targets)]
    return torch.stack(out) if out else torch.zeros(0, device=lm.device)


@torch.no_grad()
def target_probabilities(lm, prompts: Sequence[Prompt], targets: Sequence[Sequence[int]], objective: str = "prob",
                         batch_size: int = 32, *, edits: RowEdits = ()) -> list[float]:
    """Teacher-forced P(target_i | prompt_i) per row as floats ("logprob": its log)."""
    logp = target_logprobs(lm, prompts, targets, edits=edits, batch_size=batch_size).tolist()
    return logp if objective == "logprob" else [math.exp(v) for v in logp]


def target_probability(lm, prompt: Prompt, target_ids: Sequence[int], objective: str = "prob", *,
                       edits: RowEdits = ()) -> float:
    """Teacher-forced P(target | prompt) of one prompt; ``edits``, a NeuronScale or a list of them,
    all apply to it."""
    mine = (edits,) if isinstance(edits, NeuronScale) else tuple(edits)
    return target_probabilities(lm, [prompt], [target_ids], objective, edits=[mine])[0]


def answer_ranks(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Rank (1 = top) of ``answers`` (n,) in ``logits`` (n, vocab): 1 + #{v : logit_v > logit_answer},
    so tied logits share the best rank. Returns (n,) long."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    target = logits[rows, answers.to(logits.device)]  # (n,)
    return (logits > target[:, None]).sum(-1) + 1


@torch.no_grad()
def first_token_ranks(lm, prompts: Sequence[Prompt], targets: Sequence[Sequence[int]], batch_size: int = 32) -> list[int]:
    """Rank (1 = most likely) of each target's first token right after its prompt."""
    ranks = []
    for logits, t in zip(target_logits(lm, prompts, [t[:1] for t in targets], batch_size=batch_size), targets):
        ranks.append(int(answer_ranks(logits, torch.tensor([t[0]]))[0]))  # logits (1, vocab)
    return ranks
