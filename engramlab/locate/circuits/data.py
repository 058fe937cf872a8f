"""Clean/corrupted prompt pairs for circuit discovery: choosing facts, splitting, batching.

A circuit is found on *discovery* facts and judged on held-out *evaluation* facts of the same
relations. Per relation the subjects are shuffled (``seed``) and the first ``split`` share goes to
discovery; corrupted partners are drawn inside each side only, so evaluation never touches a
discovery fact, not even as a corrupted prompt.

Facts are skipped, with the reason written down, when the answer tokenizes to nothing, the model
does not rank the answer's first token first (``require_correct``), no other subject on the same
side gives a prompt of the same token length, or both answers start with the same token (the logit
difference would be 0 by construction).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engramlab.data.facts import CorruptedPair, FactSet, corrupted_pairs, render, target_token_ids
from engramlab.errors import EngramError
from engramlab.models.loading import pad_rows
from engramlab.models.scoring import first_token_ranks, text_ids


@dataclass
class PairBatch:
    """Token tensors of clean/corrupted pairs, right-padded; clean and corrupted rows align.

    clean_ids, corrupt_ids  (b, pos) long
    mask                    (b, pos) long, 1 on real tokens (the same for both prompts)
    last                    (b,) long, position of the last real token (where the answer is read)
    clean_answer            (b,) long, first token of the clean object
    corrupt_answer          (b,) long, first token of the corrupted prompt's object
    subject                 (b, 2) long, [start, stop) of the subject tokens in the clean prompt
                            (-1 where unknown)
    """

    clean_ids: torch.Tensor
    corrupt_ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    clean_answer: torch.Tensor
    corrupt_answer: torch.Tensor
    subject: torch.Tensor

    def __len__(self) -> int:
        return self.clean_ids.shape[0]

    def rows(self, start: int, stop: int) -> "PairBatch":
        """Rows [start, stop), trimmed to their longest prompt (less padding to compute)."""
        width = int(self.mask[start:stop].sum(1).max())
        return PairBatch(self.clean_ids[start:stop, :width], self.corrupt_ids[start:stop, :width],
                         self.mask[start:stop, :width], self.last[start:stop], self.clean_answer[start:stop],
                         self.corrupt_answer[start:stop], self.subject[start:stop])

    def chunks(self, size: int):
        """Consecutive sub-batches of at most ``size`` rows."""
        for start in range(0, len(self), size):
            yield self.rows(start, min(start + size, len(self)))


def batch_from_ids(clean: list[list[int]], corrupt: list[list[int]], clean_answer: list[int],
                   corrupt_answer: list[int], subject: list[tuple[int, int]] | None = None, pad_id: int = 0,
                   device=None, names: list[str] | None = None) -> PairBatch:
    """Build a PairBatch from token rows; a pair whose two prompts differ in length is an error
    (positions must line up for a position-wise difference of activations)."""
    for i, (c, k) in enumerate(zip(clean, corrupt)):
        if len(c) != len(k):
            who = names[i] if names else f"pair {i}"
            raise EngramError(f"{who}: the corrupted prompt has {len(k)} tokens, the clean one {len(c)}; "
                              "use a corrupted subject whose prompt has the same token length "
                              "(corrupted_pairs picks one)")
        if not c:
            raise EngramError(f"{names[i] if names else f'pair {i}'}: empty prompt; give a non-empty template")
    ids, mask = pad_rows(clean, pad_id, device)
    bad, _ = pad_rows(corrupt, pad_id, device)
    spans = subject if subject is not None else [(-1, -1)] * len(clean)
    return PairBatch(ids, bad, mask, mask.sum(1) - 1, torch.tensor(clean_answer, device=device),
                     torch.tensor(corrupt_answer, device=device), torch.tensor(spans, device=device).view(-1, 2))


def subject_span(tokenizer, template: str, subject: str) -> tuple[int, int]:
    """[start, stop) of the subject's tokens in the rendered prompt (by prefix token counts)."""
    head = template.split("{}", 1)[0]
    # The space before the subject belongs to the subject's first token in BPE vocabularies, so
    # count the prefix without it.
    start = len(text_ids(tokenizer, head.rstrip())) if head.strip() else 0
    return start, len(text_ids(tokenizer, render(head + "{}", subject)))


def encode_pairs(lm, pairs: list[CorruptedPair], template_index: int = 0) -> PairBatch:
    """Tokenize pairs (answers are the first tokens of each object after its prompt)."""
    tok = lm.tokenizer
    clean = [text_ids(tok, p.clean_prompt) for p in pairs]
    corrupt = [text_ids(tok, p.corrupt_prompt) for p in pairs]
    good = [target_token_ids(tok, p.clean_prompt, p.fact.object)[0] for p in pairs]
    bad = [target_token_ids(tok, p.corrupt_prompt, p.corrupt_object)[0] for p in pairs]
    spans = [subject_span(tok, p.fact.template(template_index), p.fact.subject) for p in pairs]
    names = [f"fact {p.fact.subject!r} ({p.fact.relation})" for p in pairs]
    return batch_from_ids(clean, corrupt, good, bad, spans, lm.pad_id, lm.device, names)


@dataclass
class PairSplit:
    """Discovery and evaluation pairs, and the facts left out with their reasons."""

    discovery: list[CorruptedPair]
    evaluation: list[CorruptedPair]
    skipped: list[dict]
    n_facts: int
    n_wrong: int


def split_pairs(lm, facts: FactSet, split: float = 0.5, template_index: int = 0, seed: int = 0,
                require_correct: bool = True) -> PairSplit:
    """Filter, split and pair ``facts`` (see module docstring)."""
    if not 0 < split < 1:
        raise EngramError(f"split must be strictly between 0 and 1 (share of discovery facts), got {split}")
    tok = lm.tokenizer
    for rel, group in facts.by_relation().items():
        n_subjects = len({f.subject for f in group})
        if n_subjects < 2:
            raise EngramError(f"relation {rel!r} has {n_subjects} subject(s) in {facts.source}; corrupted prompts "
                              "need at least 2 subjects of the same relation: add facts or choose another relation")
    skipped: list[dict] = []
    usable, targets = [], []
    for fact in facts:
        prompt = fact.prompt(template_index)
        try:
            targets.append(target_token_ids(tok, prompt, fact.object))
            usable.append(fact)
        except EngramError as err:
            skipped.append(_skip(fact, f"answer tokenizes to nothing: {err}"))
    n_wrong = 0
    if require_correct and usable:
        ranks = first_token_ranks(lm, [f.prompt(template_index) for f in usable], targets)
        kept = []
        for fact, t, rank in zip(usable, targets, ranks):
            if rank == 1:
                kept.append(fact)
            else:
                n_wrong += 1
                skipped.append(_skip(fact, f"model gets it wrong: {tok.decode(t[:1])!r} ranks {rank}, not 1"))
        usable = kept

    discovery, evaluation = [], []
    rng = random.Random(seed)
    for group in FactSet(usable, facts.source).by_relation().values():
        subjects = list(dict.fromkeys(f.subject for f in group))
        rng.shuffle(subjects)
        # Keep both sides non-empty whenever there are two subjects to share out.
        n_disc = min(max(1, round(split * len(subjects))), len(subjects) - 1) if len(subjects) > 1 else 1
        disc_subjects = set(subjects[:n_disc])
        for side, out in ((True, discovery), (False, evaluation)):
            part = FactSet([f for f in group if (f.subject in disc_subjects) == side], facts.source)
            pairs = corrupted_pairs(part, tok, template_index, seed=seed)
            paired = {(p.fact.subject, p.fact.object) for p in pairs}
            for fact in part:
                if (fact.subject, fact.object) not in paired:
                    skipped.append(_skip(fact, "no other subject on its side of the split gives a prompt of the "
                                         "same token length"))
            for p in pairs:
                same = (target_token_ids(tok, p.clean_prompt, p.fact.object)[0]
                        == target_token_ids(tok, p.corrupt_prompt, p.corrupt_object)[0])
                if same:
                    skipped.append(_skip(p.fact, f"corrupted answer {p.corrupt_object!r} starts with the same "
                                         "token as the clean one"))
                else:
                    out.append(p)
    if not discovery or not evaluation:
        raise EngramError(f"{facts.source}: {len(discovery)} discovery and {len(evaluation)} evaluation pairs "
                          f"left after filtering ({len(skipped)} facts skipped, {n_wrong} wrong); both need at "
                          "least one: use more facts, another relation, or another template")
    return PairSplit(discovery, evaluation, skipped, len(facts), n_wrong)


def _skip(fact, reason: str) -> dict:
    return {"relation": fact.relation, "subject": fact.subject, "object": fact.object, "reason": reason}
