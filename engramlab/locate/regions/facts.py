"""Regions of a fact set: its sentences as two corpora, template tokens and answer tokens.

Does a model keep its knowledge in the same parameters as its language? Zhang et al. find a core
*linguistic* region; this module lets ``find_regions`` ask the question on facts. Every fact's
sentence under each of its templates, ``prompt + " " + object``, is one row of token ids (no
special tokens, as ``score_recall`` reads them), right-padded to the longest row. Two corpora share
those rows and differ only in which tokens are scored (``Corpus.targets``):

- ``template``: the prompt's tokens after the first (the template words and the subject's name),
  what a model needs its language for;
- ``value``: the object's tokens (``target_token_ids``), the fact itself.

On a synthetic world these are the world's own template and attribute-value tokens (the value
spans ``World.biography`` marks are exactly the objects). The importance of each corpus, its top
region and the overlap of the two are then the ordinary regions machinery; ``find_regions`` also
scores every fact (``score_recall``) with each region zeroed.

Right padding needs no attention mask for a causal model: a padded position comes after every real
one and is never a target, so it changes no real token's loss.
"""

from __future__ import annotations

import torch

from engramlab.data.corpora import Corpus
from engramlab.data.facts import _encode, target_token_ids
from engramlab.errors import EngramError

CORPORA = ("template", "value")


def fact_rows(facts, tokenizer) -> list[tuple[list[int], int]]:
    """(token ids of prompt + target, number of prompt tokens) for every fact and template."""
    rows = []
    for fact in facts:
        for t in range(len(fact.templates)):
            prompt = fact.prompt(t)
            ids = _encode(tokenizer, prompt)
            rows.append((ids + target_token_ids(tokenizer, prompt, fact.object), len(ids)))
    return rows


def fact_corpora(lm, facts) -> dict[str, Corpus]:
    """{"template": Corpus, "value": Corpus} over the same padded rows (n_rows, longest), each
    scoring its own tokens (module docstring)."""
    if lm.tokenizer is None:
        raise EngramError("regions on facts: the model has no tokenizer to read the facts with; give a model "
                          "directory with its tokenizer files")
    rows = fact_rows(facts, lm.tokenizer)
    if not rows:
        raise EngramError(f"{getattr(facts, 'source', 'facts')}: no facts to find regions on")
    width = max(len(ids) for ids, _ in rows)
    pad = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else 0
    chunks = torch.full((len(rows), width), int(pad), dtype=torch.long)     # (n_rows, width)
    template = torch.zeros((len(rows), width), dtype=torch.bool)
    value = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(rows):
        chunks[i, : len(ids)] = torch.tensor(ids)
        template[i, 1:n_prompt] = True
        value[i, n_prompt: len(ids)] = True
    source = str(getattr(facts, "source", "<facts>"))
    n_tokens = sum(len(ids) for ids, _ in rows)
    return {name: Corpus(name=name, path=f"{source} ({name} tokens)", chunks=chunks, n_tokens=n_tokens,
                         n_documents=len(rows), targets=mask)
            for name, mask in (("template", template), ("value", value))}


def is_fact_set(data) -> bool:
    """Whether ``find_regions`` was given facts (a FactSet) rather than {name: Corpus}."""
    from engramlab.data.facts import FactSet

    return isinstance(data, FactSet)
