"""GenReranker (model/network.py): teacher forcing == cached incremental decoding,
cross-attention keys/values come from encode(), padding stays finite."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from contract.config import ModelConfig
from model.network import GenReranker
from model.tensors import Inputs
from tests.support.inputs import CFG, make_inputs, make_model, random_orders


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


def expected_parameters(cfg: ModelConfig) -> dict[str, int]:
    """The parameter count of each part, from the config alone (design §1: towers, encoder,
    decoder with cross-attention, one linear map per OMTP head; no vocabulary-sized layer)."""
    s, d, f = cfg.schema, cfg.d_model, cfg.ffn_mult
    linear = lambda i, o: i * o + o  # noqa: E731 - weight + bias
    norm = 2 * d
    attention = linear(d, 3 * d) + linear(d, d)
    cross = linear(d, d) + linear(d, 2 * d) + linear(d, d)
    mlp = linear(d, f * d) + linear(f * d, d)
    return {
        "item_tower": (s.item_id_buckets + sum(s.categorical_buckets)) * d
        + linear(len(s.item_dense), d) + norm,
        "user_tower": s.user_id_buckets * d + linear(len(s.user_dense), d) + norm,
        "list_context": cfg.max_candidates * d + linear(1, d),
        "encoder": cfg.enc_layers * (2 * norm + attention + mlp) + norm,
        "decoder": d + cfg.max_steps * d + cfg.dec_layers * (3 * norm + attention + cross + mlp)
        + norm,
        "heads": d * cfg.omtp_heads * d,
    }  # fmt: skip


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_parameter_count(preset: str) -> None:
    cfg = ModelConfig.preset(preset)
    model = GenReranker(cfg)
    want = expected_parameters(cfg)
    towers = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("item_tower", "user_tower", "list_context")
    }
    assert towers == {name: want[name] for name in towers}
    assert sum(p.numel() for p in model.parameters()) == sum(want.values())
    # no vocabulary-sized output: the id embeddings hold most of the weights
    core = sum(want.values()) - sum(towers.values())
    assert core < towers["item_tower"]
