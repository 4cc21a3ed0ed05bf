"""Fitting a formatted input into a token budget without losing its end.

`format_input` writes "rte: sentence1: X sentence2: Y" (a decoder appends its answer cue after it). Cutting the
tokenised string at the budget keeps its head: a long premise then pushes out the hypothesis and the cue, and the
model is asked about a pair it never sees. `fit_texts` cuts the TEXTS instead, longest first (the rule of Hugging
Face's `truncation="longest_first"` for pairs), and keeps the template (prefix, field names, cue) whole; the
first text loses tokens on ties, so the second keeps all of its tokens as long as the first is the longer one.

Tokeniser-agnostic: the caller says how a list of texts renders to token ids and where each token of a text
ends; inputs that fit are rendered once, unchanged.
"""
from __future__ import annotations

from typing import Callable, Sequence

from crosspt.errors import ConfigError

Render = Callable[[tuple[str, ...]], list[int]]       # texts -> token ids of the whole formatted input
TokenEnds = Callable[[str], list[int]]                # text -> character end offset of each of its tokens


def shorten_longest_first(lengths: Sequence[int], excess: int) -> list[int]:
    """Token counts after removing `excess` tokens one at a time from the currently longest text (ties: the
    earliest text), never below 0."""
    out = list(lengths)
    for _ in range(max(0, int(excess))):
        longest = max(out, default=0)
        if longest == 0:
            break
        out[out.index(longest)] -= 1
    return out


def fit_texts(texts: Sequence[str], render: Render, token_ends: TokenEnds, max_tokens: int, *,
              what: str = "the input") -> list[int]:
    """Token ids of the formatted input, at most `max_tokens` long, its texts cut at token boundaries from
    their ends, longest first. Tokenising a cut text inside the template can merge differently than alone, so
    the cut is re-rendered and tightened until it fits. ConfigError when the template alone does not fit."""
    texts = tuple(texts)
    ids = render(texts)
    if len(ids) <= max_tokens:
        return ids
    ends = [token_ends(t) for t in texts]
    keep = [len(e) for e in ends]
    while len(ids) > max_tokens:
        if not any(keep):
            raise ConfigError(f"backbone.max_length {max_tokens} is too short for {what}: its template alone "
                              f"takes {len(ids)} tokens")
        keep = shorten_longest_first(keep, len(ids) - max_tokens)
        ids = render(tuple(t[:e[k - 1]] if k else "" for t, e, k in zip(texts, ends, keep)))
    return ids
