"""Prompts must fit the model: prompt + target within the context the model was built for.

Past its context a model with learned positions (GPT-2) fails with an index error, and a rotary
one (Llama) scores tokens at positions it never saw, silently. So every fact is checked up front,
with every one of its templates, and an over-long fact is refused naming its source and entry.
"""

from __future__ import annotations

from engramlab.errors import EngramError

#: No tokenizer makes tokens longer than this many characters on ordinary text; a text longer
#: than ``context * MAX_CHARS_PER_TOKEN`` characters is refused without tokenizing it (a 10 MB
#: subject would otherwise take minutes just to tokenize).
MAX_CHARS_PER_TOKEN = 32


def context_length(model) -> int | None:
    """The number of positions ``model`` was built for, or None when its config does not say."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_facts_fit(lm, facts, source: str | None = None) -> None:
    """Raise ``EngramError`` for the first fact whose prompt + " " + object, under any of its
    templates, is longer than the model's context (in tokens, no special tokens added)."""
    limit = context_length(lm.model)
    if limit is None or lm.tokenizer is None:
        return
    source = source or getattr(facts, "source", "facts")
    for i, fact in enumerate(facts):
        for t in range(len(fact.templates)):
            text = fact.prompt(t) + " " + fact.object
            if len(text) > limit * MAX_CHARS_PER_TOKEN:
                n = f"{len(text):,} characters"
            else:
                n_tokens = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
                if n_tokens <= limit:
                    continue
                n = f"{n_tokens:,} tokens"
            raise EngramError(f"{source} fact {i} ({fact.relation}, subject {fact.subject[:40]!r}"
                              f"{'...' if len(fact.subject) > 40 else ''}), template {t}: prompt + object is {n}, "
                              f"more than the model's context of {limit} tokens; shorten it or leave the fact out")
