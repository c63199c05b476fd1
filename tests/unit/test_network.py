"""GenReranker (model/network.py): teacher forcing == cached incremental decoding,
cross-attention keys/values come from encode(), padding stays finite."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.config import ModelConfig
from model.network import GenReranker
from model.tensors import Inputs
from tests.support.tiny import TINY_SCHEMA, tiny_config

SCHEMA = TINY_SCHEMA
CFG = tiny_config()


def make_inputs(B: int, M: int, m: torch.Tensor | None = None, seed: int = 0) -> Inputs:
    """Random hashed inputs; request b has m[b] real candidates (the first ones)."""
    g = torch.Generator().manual_seed(seed)
    if m is None:
        m = torch.randint(1, M + 1, (B,), generator=g)
    mask = torch.arange(M)[None] < m[:, None]  # (B, M)
    s = CFG.schema
    item_id = torch.randint(1, s.item_id_buckets, (B, M), generator=g)
    item_cat = torch.stack(
        [torch.randint(1, b, (B, M), generator=g) for b in s.categorical_buckets], dim=-1
    )
    # padding as model/tensors.py makes it: bucket 0, zero dense and score
    return Inputs(
        item_id=item_id.masked_fill(~mask, 0),
        item_cat=item_cat.masked_fill(~mask[..., None], 0),
        item_dense=torch.randn(B, M, len(s.item_dense), generator=g).masked_fill(
            ~mask[..., None], 0.0
        ),
        upstream_score=torch.randn(B, M, generator=g).masked_fill(~mask, 0.0),
        cand_mask=mask,
        user_id=torch.randint(1, s.user_id_buckets, (B,), generator=g),
        user_dense=torch.randn(B, len(s.user_dense), generator=g),
    )


def make_model(seed: int = 0, cfg: ModelConfig = CFG) -> GenReranker:
    torch.manual_seed(seed)
    return GenReranker(cfg).eval()


def random_orders(inp: Inputs, K: int, seed: int = 0) -> torch.Tensor:
    """(B, K) distinct real candidates per request, -1 past each request's m."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(inp.cand_mask.shape, generator=g).masked_fill(~inp.cand_mask, 2.0)
    order = noise.argsort(dim=1)[:, :K]
    real = inp.cand_mask.gather(1, order)
    return torch.where(real, order, -1)


def incremental(model: GenReranker, inp: Inputs, order: torch.Tensor, chunk: int) -> torch.Tensor:
    """Scores of [BOS, order[:, :-1]] fed through decode() with the KV cache: BOS alone,
    then `chunk` tokens per pass. (B, K, n, M)."""
    enc = model.encode(model.embed_items(inp), inp)
    tokens = torch.cat([torch.full_like(order[:, :1], -1), order[:, :-1]], dim=1)
    out, past = model.decode(enc, tokens[:, :1], None)
    outs = [out]
    for s in range(1, tokens.shape[1], chunk):
        out, past = model.decode(enc, tokens[:, s : s + chunk], past)
        outs.append(out)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunk", [1, 2, CFG.omtp_heads])
def test_teacher_forcing_equals_cached_decoding(chunk: int) -> None:
    model = make_model()
    inp = make_inputs(B=5, M=12, m=torch.tensor([12, 9, 4, 12, 7]))
    order = random_orders(inp, K=8)  # request 2 has only 4 candidates: -1 padding in order
    with torch.no_grad():
        forced = model(inp, order)
        cached = incremental(model, inp, order, chunk)
    assert forced.shape == (5, 8, CFG.omtp_heads, 12)
    torch.testing.assert_close(cached, forced, atol=1e-5, rtol=1e-5)


def test_teacher_forcing_equals_cached_decoding_paper_depth() -> None:
    cfg = replace(CFG, d_model=64, n_attn_heads=4, enc_layers=4, dec_layers=4, omtp_heads=4)
    model = make_model(cfg=cfg)
    inp = make_inputs(B=3, M=20, m=torch.tensor([20, 13, 17]))
    order = random_orders(inp, K=14)
    with torch.no_grad():
        torch.testing.assert_close(
            incremental(model, inp, order, chunk=4), model(inp, order), atol=1e-5, rtol=1e-5
        )


def test_present_cache_grows_by_the_new_steps() -> None:
    model = make_model()
    inp = make_inputs(B=2, M=6)
    enc = model.encode(model.embed_items(inp), inp)
    _, past = model.decode(enc, torch.full((2, 1), -1), None)
    _, present = model.decode(enc, torch.tensor([[0, 1, 2], [2, 1, 0]]), past)
    hd = CFG.d_model // CFG.n_attn_heads
    assert len(present) == CFG.dec_layers
    for (pk, pv), (k, v) in zip(past, present, strict=True):
        assert pk.shape == (2, CFG.n_attn_heads, 1, hd)
        assert k.shape == v.shape == (2, CFG.n_attn_heads, 4, hd)
        torch.testing.assert_close(k[:, :, :1], pk)  # concat(past, new) along steps
        torch.testing.assert_close(v[:, :, :1], pv)


def test_cross_kv_come_from_encode_only() -> None:
    model = make_model()
    inp = make_inputs(B=3, M=10)
    order = random_orders(inp, K=4)
    tokens = torch.cat([torch.full_like(order[:, :1], -1), order[:, :-1]], dim=1)
    enc = model.encode(model.embed_items(inp), inp)
    calls = []
    hooks = [b.cross.kv.register_forward_hook(lambda *_: calls.append(1)) for b in model.dec_blocks]
    with torch.no_grad():
        base, _ = model.decode(enc, tokens)
        # the decoder reads enc.cross_kv: changing them changes the scores ...
        zeroed = enc._replace(cross_kv=tuple((k * 0, v * 0) for k, v in enc.cross_kv))
        assert not torch.allclose(model.decode(zeroed, tokens)[0], base)
        # ... and nothing else: fresh projections of the same z give the same scores
        fresh = enc._replace(cross_kv=tuple(b.cross.project_kv(enc.z) for b in model.dec_blocks))
        calls.clear()
        torch.testing.assert_close(model.decode(fresh, tokens)[0], base)
    for h in hooks:
        h.remove()
    assert calls == []  # no key/value projection inside decode()


def test_scores_finite_with_padded_candidates() -> None:
    model = make_model()
    m = torch.tensor([1, 3, 10, 0])  # an empty request too
    inp = make_inputs(B=4, M=10, m=m)
    order = random_orders(inp, K=5)
    scores = model(inp, order)
    assert torch.isfinite(scores).all()
    scores.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padding_candidates_do_not_change_real_scores() -> None:
    model = make_model()
    inp = make_inputs(B=2, M=6, m=torch.tensor([6, 6]))
    order = random_orders(inp, K=4)
    wide = Inputs(
        item_id=torch.cat([inp.item_id, torch.zeros(2, 3, dtype=torch.long)], 1),
        item_cat=torch.cat([inp.item_cat, torch.zeros(2, 3, 2, dtype=torch.long)], 1),
        item_dense=torch.cat([inp.item_dense, torch.randn(2, 3, 3)], 1),
        upstream_score=torch.cat([inp.upstream_score, torch.randn(2, 3)], 1),
        cand_mask=torch.cat([inp.cand_mask, torch.zeros(2, 3, dtype=torch.bool)], 1),
        user_id=inp.user_id,
        user_dense=inp.user_dense,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(wide, order)[..., :6], model(inp, order))


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_parameter_count(preset: str) -> None:
    model = GenReranker(ModelConfig.preset(preset))
    towers = sum(
        p.numel()
        for mod in (model.item_tower, model.user_tower, model.list_context)
        for p in mod.parameters()
    )
    total = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {total:,} parameters ({total - towers:,} outside the embedding towers)")
