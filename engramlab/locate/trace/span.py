"""Where the subject sits in a prompt's tokens: the span [b, e) causal tracing corrupts.

With a fast tokenizer the span is read from the character offsets of the prompt's tokens: every
token that overlaps the subject's characters (a token straddling the subject's edge counts, as in
ROME's ``find_token_range``). Without offsets the tokens are decoded one by one and their lengths
(whitespace removed) laid end to end. Either way the span must *decode back to the subject*
(whitespace ignored); otherwise the subject is not in the prompt's tokens (an unknown-word token,
a normaliser that changes the text) and the fact is skipped with that reason.
"""

from __future__ import annotations

from typing import Sequence


def _squash(text: str) -> str:
    return "".join(str(text).split())


def _subject_start(prompt: str, subject: str, template: str) -> int:
    """Character index of the subject in ``prompt``: where the template puts it, else its first occurrence."""
    pre = template.split("{}", 1)[0]
    if "{" not in pre and "}" not in pre and prompt.startswith(pre + subject):
        return len(pre)
    return prompt.find(subject)


def _offsets(tokenizer, prompt: str, ids: Sequence[int]):
    """Character (start, end) of each token of ``ids``, or None when the tokenizer gives none for them."""
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:  # slow tokenizers and tokenizers.Tokenizer have no offsets mapping here
        return None
    if list(enc["input_ids"]) != list(ids):
        return None
    return [tuple(o) for o in enc["offset_mapping"]]


def subject_span(tokenizer, ids: Sequence[int], prompt: str, subject: str, template: str
                 ) -> tuple[tuple[int, int] | None, str | None]:
    """``((b, e), None)``: tokens b..e-1 of ``ids`` (the tokens of ``prompt``) hold ``subject``;
    ``(None, reason)`` when they do not."""
    ids = [int(i) for i in ids]
    c0 = _subject_start(prompt, subject, template)
    if c0 < 0:
        return None, f"subject {subject!r} is not in the prompt {prompt!r}"
    c1 = c0 + len(subject)
    offsets = _offsets(tokenizer, prompt, ids)
    if offsets is not None:
        inside = [k for k, (s, t) in enumerate(offsets) if t > s and t > c0 and s < c1]
    else:  # decode piece by piece; lengths without whitespace, positions in the squashed prompt
        pieces = [_squash(tokenizer.decode([i])) for i in ids]
        whole = "".join(pieces)
        target = _squash(subject)
        start = len(_squash(prompt[:c0]))
        if whole[start:start + len(target)] != target:
            start = whole.find(target)
        if start < 0 or not target:
            inside = []
        else:
            ends, pos = [], 0
            for p in pieces:
                pos += len(p)
                ends.append(pos)
            begins = [end - len(p) for end, p in zip(ends, pieces)]
            inside = [k for k in range(len(ids)) if ends[k] > begins[k] and ends[k] > start
                      and begins[k] < start + len(target)]
    if not inside:
        return None, f"subject {subject!r} not found in the prompt's tokens"
    b, e = inside[0], inside[-1] + 1
    decoded = tokenizer.decode(ids[b:e])
    if _squash(subject) not in _squash(decoded):
        return None, (f"subject {subject!r} not found in the prompt's tokens (the tokens over its characters "
                      f"decode to {decoded!r})")
    return (b, e), None


__all__ = ["subject_span"]
