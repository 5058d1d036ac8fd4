"""Metrics of one generation (hypothesis) against its reference: pure functions of a pair.

Token metrics compare the id lists; text metrics compare the decoded texts. Every score but
`common_prefix` lies in [0, 1], 1 meaning identical. Two empty outputs count as identical (1.0);
an empty output against a non-empty one scores 0.0.

METEOR needs WordNet for nltk: call `wordnet_setup.ensure_wordnet()` once first.
"""
from __future__ import annotations

import functools
from typing import Sequence


def common_prefix(hyp: Sequence[int], ref: Sequence[int]) -> int:
    """How many leading tokens the two outputs share."""
    n = 0
    for a, b in zip(hyp, ref):
        if a != b:
            break
        n += 1
    return n


def first_divergence(hyp: Sequence[int], ref: Sequence[int]) -> int | None:
    """Index of the first token where the outputs differ (one ending early counts), None if equal."""
    if list(hyp) == list(ref):
        return None
    return common_prefix(hyp, ref)


def exact_match(hyp: Sequence[int], ref: Sequence[int]) -> float:
    """1.0 when the token ids are identical, else 0.0."""
    return 1.0 if list(hyp) == list(ref) else 0.0


def prefix_ratio(hyp: Sequence[int], ref: Sequence[int]) -> float:
    """The common prefix as a share of the longer output: 1.0 identical, 0.0 differing at token 0."""
    longest = max(len(hyp), len(ref))
    return 1.0 if longest == 0 else common_prefix(hyp, ref) / longest


def _empty_pair_score(hyp: str, ref: str) -> float | None:
    """Texts with no words: both empty score 1.0, one empty 0.0; None when both have words."""
    if hyp.strip() and ref.strip():
        return None
    return 1.0 if not hyp.strip() and not ref.strip() else 0.0


def meteor(hyp: str, ref: str) -> float:
    """nltk's METEOR on whitespace-split words (lowercased, Porter stems, WordNet synonyms).

    nltk's fragmentation penalty is 0.5·(chunks/matches)³ even for a perfect match, so identical
    texts of n words score 1 − 0.5/n³ (a one-word text scores 0.5).
    """
    from nltk.translate.meteor_score import meteor_score

    empty = _empty_pair_score(hyp, ref)
    if empty is not None:
        return empty
    return float(meteor_score([ref.split()], hyp.split()))


def chrf(hyp: str, ref: str) -> float:
    """sacrebleu's sentence chrF (character 6-grams, β = 2) on a 0–1 scale (sacrebleu prints 0–100)."""
    empty = _empty_pair_score(hyp, ref)
    if empty is not None:
        return empty
    return _chrf_scorer().sentence_score(hyp, [ref]).score / 100.0


@functools.lru_cache(maxsize=1)
def _chrf_scorer():
    from sacrebleu.metrics import CHRF

    return CHRF()
