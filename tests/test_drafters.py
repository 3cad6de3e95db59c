"""Prompt-lookup drafting: longest suffix n-gram, most recent earlier occurrence, incremental index == brute force."""

import random

import pytest
import torch

from mspeckv.decoding.accept import speculative_accept
from mspeckv.decoding.drafters import NGramDrafter


def brute(h: list[int], max_ngram: int, min_ngram: int, k: int) -> list[int]:
    for n in range(min(max_ngram, len(h)), min_ngram - 1, -1):
        for s in range(len(h) - n - 1, -1, -1):  # latest start strictly before the suffix itself
            if h[s:s + n] == h[-n:]:
                return h[s + n:s + n + k]
    return []


def test_basic_match_and_history_end():
    d = NGramDrafter(max_ngram=3, k=4)
    assert d.propose([1, 2, 3, 4, 1, 2, 3]) == [4, 1, 2, 3]
    assert d.propose([4, 5, 4]) == [5, 4]  # fewer than k: the history ends
    assert d.propose([1, 2, 3]) == []  # no earlier occurrence of any suffix
    assert d.propose([]) == [] and d.propose([7]) == []


def test_longest_ngram_preferred_over_more_recent_shorter():
    h = [5, 6, 7, 9, 1, 7, 8, 5, 6, 7]  # (5,6,7) at 0 -> 9...; the 1-gram (7) recurs later at 5 -> 8...
    assert NGramDrafter(max_ngram=3, k=4).propose(h) == [9, 1, 7, 8]
    assert NGramDrafter(max_ngram=1, k=2).propose(h) == [8, 5]


def test_most_recent_occurrence():
    assert NGramDrafter(max_ngram=2, k=3).propose([1, 2, 10, 1, 2, 20, 1, 2]) == [20, 1, 2]


def test_min_ngram_and_k_override_and_tensor_input():
    d = NGramDrafter(max_ngram=3, min_ngram=2, k=2)
    assert d.propose([3, 9, 4, 1, 3]) == []  # only the 1-gram (3) matches, below min_ngram
    assert d.propose(torch.tensor([1, 2, 3, 1, 2])) == [3, 1]
    assert d.propose([1, 2, 3, 1, 2], k=5) == [3, 1, 2]
    with pytest.raises(ValueError, match="min_ngram"):
        NGramDrafter(max_ngram=1, min_ngram=2)


def test_incremental_index_matches_brute_force():
    rng = random.Random(0)
    d = NGramDrafter(max_ngram=4, min_ngram=1, k=5)
    h: list[int] = []
    for step in range(300):
        if step % 50 == 49:
            h = h[:-7]  # not an extension (rollback): the drafter must re-index
        h = h + [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
        assert d.propose(h) == brute(h, 4, 1, 5), step


def test_proposal_probs_one_hot_and_verification():
    q = NGramDrafter.proposal_probs([3, 0, 5], vocab=7)
    assert q.shape == (1, 3, 7) and torch.equal(q.argmax(-1), torch.tensor([[3, 0, 5]])) and (q.sum(-1) == 1).all()
    assert NGramDrafter.proposal_probs([], vocab=7).shape == (1, 0, 7)
    # a target that agrees with the proposal accepts all of it, then draws the bonus from p_γ
    p = torch.nn.functional.one_hot(torch.tensor([[3, 0, 5, 2]]), 7).float()
    n, nxt = speculative_accept(q, p, torch.tensor([[3, 0, 5]]))
    assert n.tolist() == [3] and nxt.tolist() == [2]
