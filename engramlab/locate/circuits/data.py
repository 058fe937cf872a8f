"""Clean/corrupted prompt pairs for circuit discovery: choosing facts, splitting, batching.

A circuit is found on *discovery* facts and judged on held-out *evaluation* facts of the same
relations. Per relation the subjects are shuffled (``seed``) and the first ``split`` share goes to
discovery; corrupted partners are drawn inside each side only, so evaluation never touches a
discovery fact, not even as a corrupted prompt.

Facts are skipped, with the reason written down, when the answer tokenizes to nothing, the model
does not rank the answer's first token first (``require_correct``), no other subject on the same
side gives a prompt of the same token length, or both answers start with the same token (the logit
difference would be 0 by construction).

``fixed_pairs`` instead reads the sides and corrupted partners of an earlier result's
``records.jsonl`` (``engram evolve`` runs every checkpoint on the pairs chosen on the final one):
no correctness filter, no shuffling; only pairs that can no longer be built are skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from engramlab.data.facts import CorruptedPair, FactSet, corrupted_pairs, render, target_token_ids
from engramlab.errors import EngramError
from engramlab.models.loading import pad_rows
from engramlab.models.scoring import first_token_ranks, text_ids
from engramlab.runs import read_jsonl


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

    def take(self, index: torch.Tensor) -> "PairBatch":
        """The rows ``index`` (n,) long, in that order (not trimmed)."""
        index = index.to(self.clean_ids.device)
        return PairBatch(self.clean_ids[index], self.corrupt_ids[index], self.mask[index], self.last[index],
                         self.clean_answer[index], self.corrupt_answer[index], self.subject[index])

    def by_length(self) -> tuple["PairBatch", torch.Tensor]:
        """(the rows sorted by prompt length, longest first; order (n,) long with
        sorted[i] = self[order[i]]). Chunks of the sorted rows carry little padding, and each row's
        numbers do not depend on the rows beside it, so a caller evaluates these and puts its
        per-row results back with ``unsort``."""
        order = torch.sort(self.mask.sum(1).cpu(), descending=True, stable=True).indices
        return self.take(order), order


def unsort(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-row ``values`` (n, ...) of ``PairBatch.by_length``'s rows back in the original order."""
    out = torch.empty_like(values)
    out[order.to(values.device)] = values
    return out


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
    """Discovery and evaluation pairs, and the facts left out with their reasons.

    ``n_wrong``: facts the correctness filter dropped (0 when no filter ran: ``require_correct``
    off, or fixed pairs)."""

    discovery: list[CorruptedPair]
    evaluation: list[CorruptedPair]
    skipped: list[dict]
    n_facts: int
    n_wrong: int
    filtered: bool = True  # False: the model's correctness was not used to choose the pairs


ROLES = ("discovery", "evaluation")
PAIR_KEYS = ("relation", "subject", "corrupt_subject", "corrupt_object")


def split_pairs(lm, facts: FactSet, split: float = 0.5, template_index: int = 0, seed: int = 0,
                require_correct: bool = True, pairs: str | Path | None = None, progress=None) -> PairSplit:
    """Filter, split and pair ``facts`` (see module docstring); with ``pairs`` (a circuit result's
    ``records.jsonl`` or its directory) take the pairs from there instead (``fixed_pairs``;
    ``split``, ``seed`` and ``require_correct`` do not apply). ``progress`` wraps the iterator of
    the correctness filter's batches (e.g. a progress bar)."""
    if pairs is not None:
        return fixed_pairs(lm, facts, pairs, template_index)
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
        ranks = _ranks(lm, [f.prompt(template_index) for f in usable], targets, progress)
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
    return PairSplit(discovery, evaluation, skipped, len(facts), n_wrong, filtered=require_correct)


def _ranks(lm, prompts: list[str], targets: list[list[int]], progress=None, size: int = 32) -> list[int]:
    """``first_token_ranks`` in slices of ``size`` prompts, each slice one step of ``progress``."""
    starts = range(0, len(prompts), size)
    ranks: list[int] = []
    for i in (progress(starts) if progress else starts):
        ranks += first_token_ranks(lm, prompts[i: i + size], targets[i: i + size], batch_size=size)
    return ranks


def pair_records(split: PairSplit) -> list[dict]:
    """The discovery/evaluation rows ``read_pair_records`` reads back (what ``CircuitResult.records``
    writes for them, without ``correct``): a split to freeze and reuse with ``CircuitConfig.pairs``."""
    return [{"relation": p.fact.relation, "subject": p.fact.subject, "object": p.fact.object, "role": role,
             "corrupt_subject": p.corrupt_subject, "corrupt_object": p.corrupt_object}
            for role, side in (("discovery", split.discovery), ("evaluation", split.evaluation)) for p in side]


def read_pair_records(path: str | Path) -> tuple[Path, list[tuple[int, dict]]]:
    """(file, [(line number, row)]) of the discovery/evaluation rows of a circuit result's
    ``records.jsonl`` (``path`` is the file or its directory). Rows of other roles are ignored;
    a row without one of ``PAIR_KEYS`` is an error naming the file and line."""
    file = Path(path)
    if file.is_dir():
        file = file / "records.jsonl"
    if not file.is_file():
        raise EngramError(f"{file}: no such pairs file; give --pairs a circuit result's records.jsonl or its "
                          "directory")
    rows = []
    for line, row in enumerate(read_jsonl(file), 1):
        if not isinstance(row, dict) or row.get("role") not in ROLES:
            continue
        missing = [k for k in PAIR_KEYS if not isinstance(row.get(k), str)]
        if missing:
            raise EngramError(f"{file} line {line}: a {row['role']} row without {', '.join(missing)}; "
                              "use the records.jsonl an `engram circuit` run wrote")
        rows.append((line, row))
    if not any(r["role"] == "discovery" for _, r in rows) or not any(r["role"] == "evaluation" for _, r in rows):
        raise EngramError(f"{file}: needs discovery and evaluation rows (role); is this a circuit result's "
                          "records.jsonl?")
    return file, rows


def fixed_pairs(lm, facts: FactSet, path: str | Path, template_index: int = 0) -> PairSplit:
    """The discovery/evaluation pairs written in ``path`` (see ``read_pair_records``), matched to
    ``facts`` by (relation, subject) (by object too where a subject has several facts).

    Each pair keeps its side and its corrupted subject and answer; the prompts are rendered from
    the fact's template ``template_index``. No correctness filter. A pair is skipped, with the
    reason, when its answer tokenizes to nothing, its corrupted prompt has another token length
    than the clean one, or both answers start with the same token (possible only under another
    tokenizer than the one the pairs were chosen with). A row naming a fact that is not in
    ``facts`` is an error."""
    file, rows = read_pair_records(path)
    tok = lm.tokenizer
    by_key: dict[tuple[str, str], list] = {}
    for fact in facts:
        by_key.setdefault((fact.relation, fact.subject), []).append(fact)
    sides: dict[str, list[CorruptedPair]] = {role: [] for role in ROLES}
    skipped: list[dict] = []
    for line, row in rows:
        found = by_key.get((row["relation"], row["subject"]))
        if not found:
            raise EngramError(f"{file} line {line}: {row['role']} pair ({row['relation']!r}, {row['subject']!r}) "
                              f"is not a fact of {facts.source}; give the facts the pairs were chosen from")
        fact = next((f for f in found if f.object == row.get("object")), found[0])
        pair = CorruptedPair(fact, row["corrupt_subject"], fact.prompt(template_index),
                             render(fact.template(template_index), row["corrupt_subject"]), row["corrupt_object"])
        why = _unusable(tok, pair)
        if why:
            skipped.append(_skip(fact, why))
        else:
            sides[row["role"]].append(pair)
    if not sides["discovery"] or not sides["evaluation"]:
        raise EngramError(f"{file}: {len(sides['discovery'])} discovery and {len(sides['evaluation'])} evaluation "
                          f"pairs left ({len(skipped)} skipped: {skipped[0]['reason'] if skipped else ''}); both "
                          "need at least one")
    return PairSplit(sides["discovery"], sides["evaluation"], skipped, len(facts), 0, filtered=False)


def _unusable(tok, pair: CorruptedPair) -> str | None:
    """Why ``pair`` cannot be a clean/corrupted pair under ``tok`` (None when it can)."""
    try:
        clean = target_token_ids(tok, pair.clean_prompt, pair.fact.object)[0]
        corrupt = target_token_ids(tok, pair.corrupt_prompt, pair.corrupt_object)[0]
    except EngramError as err:
        return f"answer tokenizes to nothing: {err}"
    if len(text_ids(tok, pair.clean_prompt)) != len(text_ids(tok, pair.corrupt_prompt)):
        return f"the corrupted prompt (subject {pair.corrupt_subject!r}) has another token length than the clean one"
    if clean == corrupt:
        return f"corrupted answer {pair.corrupt_object!r} starts with the same token as the clean one"
    return None


def _skip(fact, reason: str) -> dict:
    return {"relation": fact.relation, "subject": fact.subject, "object": fact.object, "reason": reason}
