"""Reference decoding (model/decode.py): valid lists, pass counts, the deadline hook,
agreement with a cache-free brute force, and beam search vs greedy."""

from __future__ import annotations

import math

import pytest
import torch

from model.decode import DecodeResult, beam_decode, greedy_decode, rank_scores
from model.losses import sequence_logprob
from model.network import GenReranker
from model.tensors import Inputs
from tests.support.inputs import CFG, make_inputs, make_model

N = CFG.omtp_heads


def assert_valid(res: DecodeResult, inp: Inputs, k: int) -> None:
    """No repeats, no padding candidates, -1 exactly past each request's m."""
    B = inp.batch_size
    assert res.order.shape == res.item_scores.shape == (B, k)
    m = inp.cand_mask.sum(dim=1)
    for b in range(B):
        got = res.order[b]
        n_real = min(k, int(m[b]))
        assert (got[:n_real] >= 0).all() and (got[n_real:] == -1).all()
        real = got[:n_real].tolist()
        assert len(set(real)) == n_real
        assert inp.cand_mask[b, real].all()
        assert torch.isfinite(res.item_scores[b, :n_real]).all()


def brute_force(model: GenReranker, inp: Inputs, k: int) -> torch.Tensor:
    """Greedy head 0, re-running forward() on the growing prefix, no cache."""
    B, M = inp.cand_mask.shape
    prefix = torch.empty(B, 0, dtype=torch.long)
    available = inp.cand_mask.clone()
    for _ in range(min(k, M)):
        scores = model(inp, torch.cat([prefix, torch.full((B, 1), -1)], dim=1))  # (B, t+1, n, M)
        idx = scores[:, -1, 0].masked_fill(~available, float("-inf")).argmax(dim=1)
        ok = available.gather(1, idx[:, None])[:, 0]
        available[torch.arange(B), idx] = False
        prefix = torch.cat([prefix, torch.where(ok, idx, -1)[:, None]], dim=1)
    return torch.nn.functional.pad(prefix, (0, k - prefix.shape[1]), value=-1)


@pytest.mark.parametrize("p", [1, 2, N])
def test_greedy_lists_are_valid_and_take_ceil_k_over_p_passes(p: int) -> None:
    model = make_model()
    inp = make_inputs(B=4, M=12, m=torch.tensor([12, 12, 10, 11]))
    res = greedy_decode(model, inp, k=8, items_per_pass=p)
    assert_valid(res, inp, 8)
    assert res.passes == math.ceil(8 / p)
    assert not res.completed_early


def test_fewer_candidates_than_k_fill_with_minus_one() -> None:
    model = make_model()
    inp = make_inputs(B=4, M=9, m=torch.tensor([2, 9, 5, 0]))
    for res in (greedy_decode(model, inp, k=7), beam_decode(model, inp, k=7, beam=3)):
        assert_valid(res, inp, 7)
    short = make_inputs(B=2, M=3, m=torch.tensor([3, 1]))
    res = greedy_decode(model, short, k=6, items_per_pass=1)
    assert_valid(res, short, 6)
    assert res.passes == 3  # stops once the longest request is exhausted


@pytest.mark.parametrize("seed", range(3))
def test_one_item_per_pass_equals_brute_force_without_cache(seed: int) -> None:
    model = make_model(seed)
    inp = make_inputs(B=5, M=10, seed=seed)
    res = greedy_decode(model, inp, k=6, items_per_pass=1)
    torch.testing.assert_close(res.order, brute_force(model, inp, k=6))


def test_multi_item_pass_uses_heads_in_order() -> None:
    """Pass 0 with p = n: head j's pick is the argmax of head j's BOS scores, skipping
    the picks of heads < j."""
    model = make_model()
    inp = make_inputs(B=3, M=8, m=torch.tensor([8, 8, 8]))
    res = greedy_decode(model, inp, k=N, items_per_pass=N)
    enc = model.encode(model.embed_items(inp), inp)
    with torch.no_grad():
        last = model.decode(enc, torch.full((3, 1), -1))[0][:, -1]  # (B, n, M)
    available = inp.cand_mask.clone()
    for j in range(N):
        idx = last[:, j].masked_fill(~available, float("-inf")).argmax(dim=1)
        assert torch.equal(res.order[:, j], idx)
        available[torch.arange(3), idx] = False
    assert res.passes == 1


def test_max_passes_completes_early_with_distinct_items() -> None:
    model = make_model()
    inp = make_inputs(B=3, M=12, m=torch.tensor([12, 11, 12]))
    full = greedy_decode(model, inp, k=9, items_per_pass=2)
    cut = greedy_decode(model, inp, k=9, items_per_pass=2, max_passes=2)
    assert cut.passes == 2 and cut.completed_early and not full.completed_early
    assert_valid(cut, inp, 9)
    assert torch.equal(cut.order[:, :4], full.order[:, :4])  # the passes that did run agree
    # the completed tail is sorted by head 0's scores
    assert (cut.item_scores[:, 4:-1] >= cut.item_scores[:, 5:]).all()
    enough = greedy_decode(model, inp, k=9, items_per_pass=2, max_passes=5)
    assert not enough.completed_early and torch.equal(enough.order, full.order)


def test_beam_one_equals_greedy_one_item_per_pass() -> None:
    model = make_model()
    inp = make_inputs(B=6, M=10)
    beam = beam_decode(model, inp, k=7, beam=1)
    greedy = greedy_decode(model, inp, k=7, items_per_pass=1)
    assert torch.equal(beam.order, greedy.order)
    torch.testing.assert_close(beam.item_scores, greedy.item_scores)


def test_beam_finds_at_least_greedy_logprob() -> None:
    """Beam search is not guaranteed to beat greedy on every request (a greedy prefix can
    be pruned), so: never worse in total, at least as good on nearly every request, and
    strictly better on some."""
    lp_b, lp_g = [], []
    for seed in range(4):
        model = make_model(seed)
        inp = make_inputs(B=8, M=10, m=torch.full((8,), 10), seed=seed)
        res_b = beam_decode(model, inp, k=6, beam=4)
        res_g = greedy_decode(model, inp, k=6, items_per_pass=1)
        assert_valid(res_b, inp, 6)
        with torch.no_grad():
            lp_b.append(sequence_logprob(model(inp, res_b.order), res_b.order, inp.cand_mask))
            lp_g.append(sequence_logprob(model(inp, res_g.order), res_g.order, inp.cand_mask))
    b, g = torch.cat(lp_b), torch.cat(lp_g)  # (32,)
    assert b.sum() >= g.sum()
    assert (b >= g - 1e-5).float().mean() >= 0.9
    assert (b > g + 1e-5).any()


def test_beam_item_scores_are_head0_scores_of_the_order() -> None:
    """item_scores are the raw head-0 scores of the returned order under teacher forcing
    (so the beam's KV cache followed the surviving beams correctly)."""
    model = make_model()
    inp = make_inputs(B=4, M=9, m=torch.tensor([9, 9, 3, 7]))
    res = beam_decode(model, inp, k=5, beam=3)
    with torch.no_grad():
        scores = model(inp, res.order)
    head0 = scores[:, :, 0].gather(2, res.order.clamp(min=0)[:, :, None])[:, :, 0]
    real = res.order >= 0
    torch.testing.assert_close(res.item_scores[real], head0[real])


def test_rank_scores() -> None:
    order = torch.tensor([[2, 0, -1], [1, 3, 0]])
    expected = torch.tensor([[2.0, 0.0, 3.0, 0.0], [1.0, 3.0, 0.0, 2.0]])
    torch.testing.assert_close(rank_scores(order, 4), expected)


def test_bad_arguments() -> None:
    model = make_model()
    inp = make_inputs(B=1, M=5)
    with pytest.raises(ValueError):
        greedy_decode(model, inp, k=3, items_per_pass=N + 1)
    with pytest.raises(ValueError):
        greedy_decode(model, inp, k=3, max_passes=0)
