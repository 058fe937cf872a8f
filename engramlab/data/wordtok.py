"""Tokenizing worlds: the word-level tokenizer, and encoding with value masks for any tokenizer.

``build_word_tokenizer(world)`` makes a closed-vocabulary tokenizer (no download): every name
piece, value word, template word, day and year is one token, so a value is a few tokens and the
model's job is memory, not spelling. It is a ``tokenizers`` WordLevel model wrapped as a
``transformers.PreTrainedTokenizerFast``, so ``save_pretrained`` puts it into checkpoints.

``encode_biographies`` and ``encode_eval_items`` work with any *fast* HF tokenizer: value masks
come from character spans matched against ``return_offsets_mapping``, never from assumptions
about how a tokenizer splits words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from engramlab.data.world import ATTRIBUTES, MONTHS, Biography, EvalItem, World
from engramlab.errors import EngramError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in this order


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Split on whitespace, then isolate each punctuation mark, except that a possessive "'s"
    # stays one token: "Smith's" -> Smith 's; "1987." -> 1987 . ; "3," -> 3 ,
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"'s\b|[^\w\s]"), behavior="isolated"),
    ])


def world_texts(world: World) -> list[str]:
    """Every string the world can render: pools, templates, names, dates' pieces."""
    texts = [v for pool in world.pools.values() for v in pool]
    texts += [t.replace("{name}", " ").replace("{value}", " ")
              for templates in world.templates.values() for t in templates]
    texts += [p.name for p in world.people + world.heldout_people]  # real names of continual
    texts += list(MONTHS) + [str(d) for d in range(1, 32)]
    texts += [str(y) for y in range(world.config.year_min, world.config.year_max + 1)]
    return texts + [", ."]


def build_word_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is exactly the world's words.

    Vocabulary: SPECIAL_TOKENS, then the sorted words (so it does not depend on people's order).
    ``tokenizer(text)`` prepends <bos>; decoding rejoins words with spaces and re-attaches
    ".", "," and "'s", so decode(encode(text)) gives back the templates' sentences.
    """
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in world_texts(world):
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    # WordPiece's decoder joins tokens with spaces and, with cleanup, glues " ." " ," " 's".
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def uncovered_words(tokenizer, world: World) -> list[str]:
    """The pieces of ``world_texts(world)`` that ``tokenizer`` maps to its unknown token, sorted
    and unique (empty: it can write every sentence of the world). Tokenizers without an unknown
    token (byte-level BPE) cover everything by construction."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    texts = world_texts(world)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    missing = set()
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        missing.update(text[a:b] for i, (a, b) in zip(ids, offsets) if i == unk)
    return sorted(missing)


def check_covers(tokenizer, world: World, what: str) -> None:
    """EngramError unless ``tokenizer`` covers every word of ``world`` (``uncovered_words``);
    ``what`` names the tokenizer's origin and the world for the message."""
    missing = uncovered_words(tokenizer, world)
    if missing:
        shown = ", ".join(repr(w) for w in missing[:5])
        raise EngramError(f"{what}: the tokenizer has no token for {len(missing)} word(s) of the world "
                          f"(e.g. {shown}); build the world from the same pools as the tokenizer's (e.g. "
                          f"`engram world --preset continual-tiny --rel-from OLD_WORLD`)")


def _special_ids(tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) ids, falling back to eos for bos/pad (GPT-2 style tokenizers)."""
    eos, bos, pad = tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
    bos = bos if bos is not None else eos
    if bos is None:
        raise EngramError(f"tokenizer {type(tokenizer).__name__} has no bos or eos token; set "
                          f"tokenizer.bos_token or tokenizer.eos_token before encoding")
    eos = eos if eos is not None else bos
    return bos, eos, pad if pad is not None else eos


def encode_with_spans(tokenizer, texts: Sequence[str],
                      spans: Sequence[Sequence[tuple[str, int, int]]], add_eos: bool = True,
                      max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` and mark the tokens of each (attribute, char_start, char_end) span.

    A token belongs to a value when its character offsets overlap the value's span (so a
    "ĠMarch" whose offsets include the space still counts). Each row is <bos> text [<eos>],
    right-padded to the longest row. Returns
      input_ids (B, T) long, attention_mask (B, T) long,
      value_mask (B, T) bool, first_value_mask (B, T) bool (exactly one token per value),
      attribute_ids (B, T) long: index in ATTRIBUTES of the value a token belongs to, else -1.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise EngramError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; value "
                          f"masks need offsets, so load it with use_fast=True")
    if len(texts) == 0:
        raise EngramError("nothing to encode: the list of texts is empty; pass at least one")
    bos, eos, pad = _special_ids(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for ids, offsets, text_spans in zip(enc["input_ids"], enc["offset_mapping"], spans):
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        attr = np.full(len(ids), -1, dtype=np.int64)
        first = np.zeros(len(ids), dtype=bool)
        for attribute, start, end in text_spans:
            hit = np.flatnonzero((off[:, 0] < end) & (off[:, 1] > start) & (off[:, 1] > off[:, 0]))
            if len(hit) == 0:
                raise EngramError(f"value {attribute!r} at characters {start}-{end} got no "
                                  f"tokens from {type(tokenizer).__name__}; check the tokenizer")
            attr[hit] = ATTRIBUTES.index(attribute)
            first[hit[0]] = True
        tail = [eos] if add_eos else []
        rows.append(([bos, *ids, *tail], np.concatenate([[-1], attr, [-1] * len(tail)]),
                     np.concatenate([[False], first, [False] * len(tail)])))
    longest = max(len(ids) for ids, _, _ in rows)
    if max_len is not None and longest > max_len:
        raise EngramError(f"a sequence is {longest} tokens with <bos>/<eos>, longer than "
                          f"max_len={max_len}; raise max_len (or the model's context length)")
    batch = len(rows)
    input_ids = torch.full((batch, longest), pad, dtype=torch.long)
    attention = torch.zeros((batch, longest), dtype=torch.long)
    attribute_ids = torch.full((batch, longest), -1, dtype=torch.long)
    first_mask = torch.zeros((batch, longest), dtype=torch.bool)
    for i, (ids, attr, first) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        attribute_ids[i, :len(ids)] = torch.from_numpy(attr.astype(np.int64))
        first_mask[i, :len(ids)] = torch.from_numpy(first.astype(bool))
    return {"input_ids": input_ids, "attention_mask": attention,
            "value_mask": attribute_ids >= 0, "first_value_mask": first_mask,
            "attribute_ids": attribute_ids}


def encode_biographies(tokenizer, bios: Sequence[Biography],
                       max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Training batch: the dict of ``encode_with_spans`` (<bos> bio <eos>, right-padded; all
    (B, T)) plus person_index (B,). ``max_len`` only checks: longer rows raise EngramError."""
    batch = encode_with_spans(tokenizer, [b.text for b in bios], [b.spans for b in bios],
                              add_eos=True, max_len=max_len)
    batch["person_index"] = torch.tensor([b.person_index for b in bios], dtype=torch.long)
    return batch


def encode_eval_items(tokenizer, items: Sequence[EvalItem],
                      max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Evaluation batch: each row is <bos> prompt value suffix (the whole sentence, no <eos>).

    Teacher forcing: logits at position t-1 predict input_ids[:, t]; the value loss of a row is
    the summed cross-entropy over positions where value_mask is True, and the value is exactly
    recalled when the argmax is right at all of them. Returns input_ids, attention_mask,
    value_mask, first_value_mask (B, T); attribute_ids (B,) index in ATTRIBUTES; value_start (B,)
    position of the first value token; person_index (B,).
    """
    batch = encode_with_spans(tokenizer, [it.text for it in items],
                              [[(it.attribute, *it.value_span)] for it in items],
                              add_eos=False, max_len=max_len)
    batch["attribute_ids"] = torch.tensor([ATTRIBUTES.index(it.attribute) for it in items],
                                          dtype=torch.long)
    batch["value_start"] = batch["first_value_mask"].long().argmax(dim=1)
    batch["person_index"] = torch.tensor([it.person_index for it in items], dtype=torch.long)
    return batch
