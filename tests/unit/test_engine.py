"""service/engine.py and contract/bundle.py: the safe loader's refusals, parity of the
onnxruntime decode loop with the torch reference (greedy, items per pass, deadline, beam,
padding), the stage split, and no torch anywhere under service/."""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.bundle import BundleError, load_bundle, sha256_file
from export.verify import ParityConfig, run_parity
from model.decode import beam_decode, greedy_decode
from model.network import GenReranker
from service.decoding import _take
from service.engine import (
    Engine,
    EngineConfig,
    EngineError,
    RerankRequest,
    open_engine,
    valid_lists,
)
from tests.support.bundle import BUNDLE_CFG as CFG
from tests.support.inputs import random_inputs, requests_of

ROOT = Path(__file__).resolve().parents[2]
N = CFG.omtp_heads


@pytest.fixture(scope="module")
def engine(tiny_bundle: tuple[Path, GenReranker]) -> Engine:
    return open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu"))


@pytest.fixture
def model(tiny_bundle: tuple[Path, GenReranker]) -> GenReranker:
    return tiny_bundle[1]


# ---- load_bundle refusals ----------------------------------------------------------------


@pytest.fixture
def bundle_copy(tiny_bundle: tuple[Path, GenReranker], tmp_path: Path) -> Path:
    dst = tmp_path / tiny_bundle[0].name
    shutil.copytree(tiny_bundle[0], dst)
    return dst


def edit_manifest(path: Path, fn: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    fn(manifest)  # type: ignore[operator]
    (path / "manifest.json").write_text(json.dumps(manifest))


def rehash(path: Path, name: str) -> None:
    def fix(m: dict) -> None:  # type: ignore[type-arg]
        entry = {"sha256": sha256_file(path / name), "size": (path / name).stat().st_size}
        m["files"][name] = entry

    edit_manifest(path, fix)


def test_loads_a_good_bundle(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    assert bundle.version == bundle_copy.name and bundle.model_config == CFG
    assert bundle.precisions == ("fp32", "fp16")
    assert bundle.item_embeddings is not None and bundle.item_embeddings.shape[1] == 16


def test_refuses_a_corrupted_file(bundle_copy: Path) -> None:
    data = bytearray((bundle_copy / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder\.onnx: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_refuses_a_wrong_sha_in_the_manifest(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m["files"]["encoder.onnx"].update(sha256="0" * 64))
    with pytest.raises(BundleError, match=r"encoder\.onnx: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_refuses_a_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "item_tower.fp16.onnx").unlink()
    with pytest.raises(BundleError, match=r"item_tower\.fp16\.onnx: missing"):
        load_bundle(bundle_copy)


def test_refuses_a_missing_manifest(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(bundle_copy)


def test_refuses_a_future_schema_version(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match=r"manifest\.json: schema_version 99 is from a newer"):
        load_bundle(bundle_copy)


def test_refuses_an_unknown_file(bundle_copy: Path) -> None:
    shutil.copy(bundle_copy / "decoder.onnx", bundle_copy / "decoder_v2.onnx")
    with pytest.raises(BundleError, match=r"decoder_v2\.onnx: unknown file"):
        load_bundle(bundle_copy)


def test_refuses_a_graph_file_not_in_the_manifest(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m["graphs"]["fp32"]["decoder"].update(file="evil.onnx"))
    with pytest.raises(BundleError, match=r"evil\.onnx: not listed"):
        load_bundle(bundle_copy)


def test_refuses_a_corrupted_onnx_with_a_matching_sha(bundle_copy: Path) -> None:
    (bundle_copy / "decoder.onnx").write_bytes(b"not a protobuf at all")
    rehash(bundle_copy, "decoder.onnx")
    bundle = load_bundle(bundle_copy)  # the bytes are what the manifest says ...
    with pytest.raises(BundleError, match=r"decoder\.onnx: corrupted ONNX"):
        Engine(bundle, EngineConfig(device="cpu"))  # ... but no session can be made of them


def test_unloaded_item_table_is_still_verified(bundle_copy: Path) -> None:
    assert load_bundle(bundle_copy, item_table=False).item_embeddings is None
    data = bytearray((bundle_copy / "item_embeddings.npy").read_bytes())
    data[-1] ^= 0xFF
    (bundle_copy / "item_embeddings.npy").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"item_embeddings\.npy: sha256 mismatch"):
        load_bundle(bundle_copy, item_table=False)


def test_never_unpickles(bundle_copy: Path) -> None:
    np.save(bundle_copy / "item_ids.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    rehash(bundle_copy, "item_ids.npy")
    with pytest.raises(BundleError, match=r"item_ids\.npy: corrupted \.npy.*allow_pickle"):
        load_bundle(bundle_copy)


# ---- parity with the torch reference ---------------------------------------------------


def test_parity_on_random_requests(engine: Engine, model: GenReranker) -> None:
    """The `export verify` function: 200 requests, m up to 200, k up to 50, p in {1, 2, n}."""
    report = run_parity(model, engine, ParityConfig(requests=200, seed=1))
    assert report.max_m > 150 and report.max_k > 30
    assert report.items_per_pass == [1, 2, N]
    assert report.invalid == 0 and report.failures == 0, report.summary()
    assert report.head_max_abs_pass1 <= 1e-4 and report.head_max_abs_later <= 1e-4
    assert report.passed, report.summary()


def test_parity_reports_what_differs(engine: Engine) -> None:
    """Another model's engine: the report fails and says where (what `verify` prints)."""
    torch.manual_seed(123)
    other = GenReranker(CFG).eval()
    report = run_parity(other, engine, ParityConfig(requests=20, max_m=30, max_k=8))
    assert not report.passed and report.failures > 0
    assert report.head_max_abs_pass1 > 1e-4
    assert "FAILED" in report.summary() and "onnx [" in report.summary()


def test_fp16_parity_within_its_tolerance(tiny_bundle: tuple[Path, GenReranker]) -> None:
    fp16 = open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu", precision="fp16"))
    assert fp16.precision == "fp16"
    report = run_parity(tiny_bundle[1], fp16, ParityConfig.for_precision("fp16", requests=100))
    assert report.invalid == 0 and report.passed, report.summary()


@pytest.mark.parametrize("p", [1, 2, N])
def test_lists_equal_greedy_decode_for_each_items_per_pass(
    engine: Engine, model: GenReranker, p: int
) -> None:
    inp = random_inputs([12, 30, 5, 64], seed=p)
    ks = [7, 10, 5, 20]
    results = engine.rerank(requests_of(model, inp, ks), items_per_pass=p)
    ref = greedy_decode(model, inp, k=max(ks), items_per_pass=p)
    for b, res in enumerate(results):
        kb = min(ks[b], int(inp.cand_mask[b].sum()))
        np.testing.assert_array_equal(res.order, ref.order[b, :kb].numpy())
        np.testing.assert_allclose(res.scores, ref.item_scores[b, :kb].numpy(), atol=1e-5)
        assert res.passes == math.ceil(kb / p) and not res.completed_early
        assert len(set(res.order.tolist())) == kb


def test_deadline_in_the_past_completes_early_like_max_passes_1(
    engine: Engine, model: GenReranker
) -> None:
    inp = random_inputs([40, 9, 25], seed=3)
    ks = [12, 9, 2]  # the last fits in one pass (k <= n): not early
    results = engine.rerank(requests_of(model, inp, ks), deadline=0.0)
    ref = greedy_decode(model, inp, k=max(ks), max_passes=1)
    assert ref.completed_early
    for b, res in enumerate(results):
        kb = min(ks[b], int(inp.cand_mask[b].sum()))
        np.testing.assert_array_equal(res.order, ref.order[b, :kb].numpy())
        assert len(set(res.order.tolist())) == kb  # a full valid list
        assert res.passes == 1
        assert res.completed_early == (kb > N)


def test_each_request_keeps_its_own_deadline_in_a_batch(engine: Engine, model: GenReranker) -> None:
    inp = random_inputs([40, 30, 25], seed=8)
    reqs = requests_of(model, inp, [12, 12, 12])
    late = RerankRequest(**{**reqs[1].__dict__, "deadline": 0.0})  # already past
    results = engine.rerank([reqs[0], late, reqs[2]])
    full = greedy_decode(model, inp, k=12)
    cut = greedy_decode(model, inp, k=12, max_passes=1)
    for b in (0, 2):  # batch-mates decode their whole list, untouched by row 1's deadline
        np.testing.assert_array_equal(results[b].order, full.order[b].numpy())
        assert results[b].passes == math.ceil(12 / N) and not results[b].completed_early
    np.testing.assert_array_equal(results[1].order, cut.order[1].numpy())
    assert results[1].completed_early and results[1].passes == 1
    assert len(set(results[1].order.tolist())) == 12


def test_padding_and_batching_do_not_change_a_list(engine: Engine, model: GenReranker) -> None:
    inp = random_inputs([23, 130, 3, 64, 9], seed=4)
    reqs = requests_of(model, inp, [10, 40, 3, 25, 1])
    mixed = engine.rerank(reqs, items_per_pass=2)
    assert engine.bucket(23) == 32 and engine.bucket(130) == 256
    for b, req in enumerate(reqs):
        alone = engine.rerank([req], items_per_pass=2)[0]  # padded to another bucket
        np.testing.assert_array_equal(alone.order, mixed[b].order)
        np.testing.assert_allclose(alone.scores, mixed[b].scores, atol=1e-5)
        assert alone.passes == mixed[b].passes


def test_missing_embeddings_come_from_the_item_tower(engine: Engine, model: GenReranker) -> None:
    inp = random_inputs([15, 8], seed=5)
    cached = requests_of(model, inp, [6, 6])
    computed = engine.rerank(requests_of(model, inp, [6, 6], static=False))
    half = [
        RerankRequest(**{**r.__dict__, "missing": np.arange(r.m) % 2 == 0}) for r in cached
    ]  # every other row "missed" the cache
    partial = engine.rerank(half)
    for b, res in enumerate(engine.rerank(cached)):
        np.testing.assert_array_equal(computed[b].order, res.order)
        np.testing.assert_array_equal(partial[b].order, res.order)
        assert computed[b].embedded is not None and res.embedded is None
        np.testing.assert_allclose(computed[b].embedded, cached[b].static, atol=1e-5)
        assert partial[b].embedded is not None
        assert partial[b].embedded.shape == ((cached[b].m + 1) // 2, CFG.d_model)
    assert computed[0].timings.embed_s > 0 and computed[0].timings.decode_s > 0


def test_beam_equals_beam_decode(engine: Engine, model: GenReranker) -> None:
    inp = random_inputs([20, 20, 11], seed=6)
    results = engine.rerank(requests_of(model, inp, [8, 8, 8]), beam=3)
    ref = beam_decode(model, inp, k=8, beam=3)
    for b, res in enumerate(results):
        np.testing.assert_array_equal(res.order, ref.order[b].numpy())
        assert res.passes == 8
    late = engine.rerank(requests_of(model, inp, [8, 5, 8]), beam=3, deadline=0.0)
    for res in late:
        assert res.completed_early and len(set(res.order.tolist())) == len(res.order)


def test_beam_keeps_each_requests_own_deadline_in_a_batch(
    engine: Engine, model: GenReranker
) -> None:
    inp = random_inputs([20, 20, 11], seed=6)
    reqs = requests_of(model, inp, [8, 8, 8])
    late = RerankRequest(**{**reqs[1].__dict__, "deadline": 0.0})  # already past
    far = [RerankRequest(**{**r.__dict__, "deadline": time.perf_counter() + 60}) for r in reqs]
    results = engine.rerank([far[0], late, far[2]], beam=3)
    ref = beam_decode(model, inp, k=8, beam=3)
    for b in (0, 2):  # batch-mates keep their whole beam search
        np.testing.assert_array_equal(results[b].order, ref.order[b].numpy())
        assert results[b].passes == 8 and not results[b].completed_early
    # the late one: its best beam after the first step, completed by head 0 in one step
    assert results[1].completed_early and results[1].passes == 1
    assert len(set(results[1].order.tolist())) == 8
    alone = engine.rerank([late], beam=3)[0]
    np.testing.assert_array_equal(results[1].order, alone.order)


def test_stages_are_callable_alone(engine: Engine, model: GenReranker) -> None:
    inp = random_inputs([10, 4], seed=7)
    batch = engine.prepare(requests_of(model, inp, [3, 3]))
    assert batch.static.shape == (2, 16, CFG.d_model) and batch.cand_mask.sum() == 14
    enc = engine.encode(batch)
    head, past = engine.decode_pass(enc, np.full((2, 1), -1, np.int64), engine.empty_past(2))
    assert head.shape == (2, N, 16) and len(past) == 2 * CFG.dec_layers
    assert past[0].shape == (2, CFG.n_attn_heads, 1, CFG.d_model // CFG.n_attn_heads)
    dec = engine.decode(enc, np.array([3, 3]), N)
    assert dec.passes == 1 and dec.order.shape == (2, 3)
    assert engine.warmup(batch_sizes=(1, 2), k=5) > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 0}, "k=0"),
        ({"k": CFG.max_steps + 1}, "k=65"),
        ({"upstream_score": np.zeros(300, np.float32)}, "m=300"),
        ({"static": np.zeros((5, 16), np.float32)}, "static"),
        ({"static": None, "items": None}, "no item features"),
        ({"user_dense": np.zeros(2, np.float32)}, "user_dense"),
    ],
)
def test_bad_requests_are_refused(
    engine: Engine,
    model: GenReranker,
    change: dict,
    message: str,  # type: ignore[type-arg]
) -> None:
    inp = random_inputs([10], seed=8)
    req = requests_of(model, inp, [5])[0]
    with pytest.raises(EngineError, match=message):
        engine.rerank([RerankRequest(**{**req.__dict__, **change})])


def test_bad_call_arguments_are_refused(engine: Engine, model: GenReranker) -> None:
    req = requests_of(model, random_inputs([10], seed=9), [5])
    for p in (0, N + 1):
        with pytest.raises(EngineError, match="items_per_pass"):
            engine.rerank(req, items_per_pass=p)
    with pytest.raises(EngineError, match="empty batch"):
        engine.rerank([])
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")


# ---- no torch under service/ -------------------------------------------------------------


def test_engine_imports_no_torch() -> None:
    code = (
        "import sys; import service.engine, contract.bundle; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_no_torch_import_anywhere_under_service() -> None:
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path


# ---- the encoder's folded first pass -------------------------------------------------------


@pytest.fixture(scope="module")
def unfolded_engine(tiny_bundle: tuple[Path, GenReranker]) -> Engine:
    """The same checkpoint exported without first_pass: the layout of older bundles."""
    from export.build import build_bundle
    from export.config import ExportConfig

    ckpt = tiny_bundle[0].parents[1] / "ckpt"
    out = tiny_bundle[0].parents[1] / "unfolded"
    path = build_bundle(ckpt, out, ExportConfig(label="plain", first_pass=False))
    return open_engine(str(path), EngineConfig(device="cpu"))


def test_the_encoder_folds_in_the_decoders_bos_pass(engine: Engine, model: GenReranker) -> None:
    assert engine.first_pass
    inp = random_inputs([9, 4, 7], seed=3)
    batch = engine.prepare(requests_of(model, inp, [3, 3, 3]))
    enc = engine.encode(batch)
    assert enc.first is not None
    B = len(batch.k)
    head, present = engine.decode_pass(enc, np.full((B, 1), -1, np.int64), engine.empty_past(B))
    np.testing.assert_allclose(enc.first[0], head, rtol=0, atol=1e-6)
    for folded, kv in zip(enc.first[1], present, strict=True):
        assert folded.shape == kv.shape  # (B, nh, 1, hd)
        np.testing.assert_allclose(folded, kv, rtol=0, atol=1e-6)


def test_bundles_with_and_without_the_folded_pass_give_the_same_lists(
    engine: Engine, unfolded_engine: Engine, model: GenReranker
) -> None:
    assert not unfolded_engine.first_pass
    assert engine.version != unfolded_engine.version  # the export setting is in the version
    inp = random_inputs([12, 5, 30, 9], seed=4)
    reqs = requests_of(model, inp, [7, 5, 11, 2])
    for kwargs in ({"items_per_pass": 1}, {"items_per_pass": 2}, {"items_per_pass": N},
                   {"beam": 3}):  # fmt: skip
        folded = engine.rerank(reqs, **kwargs)
        plain = unfolded_engine.rerank(reqs, **kwargs)
        for a, b in zip(folded, plain, strict=True):
            np.testing.assert_array_equal(a.order, b.order)
            np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
            assert a.passes == b.passes and not a.completed_early
    # a deadline already past: the first pass's scores complete the list, in both layouts
    late = [RerankRequest(**{**r.__dict__, "deadline": 0.0}) for r in reqs]
    for a, b in zip(engine.rerank(late), unfolded_engine.rerank(late), strict=True):
        np.testing.assert_array_equal(a.order, b.order)
        assert a.completed_early == b.completed_early


def test_valid_lists_flags_repeats_padding_and_non_finite_scores() -> None:
    order = np.array([[2, 0, 1, -1],    # k = 3 of m = 3: fine (slot 3 unused)
                      [0, 0, 1, 2],     # a repeat
                      [0, 1, 5, 2],     # 5: a padding slot of an m = 4 list
                      [3, 1, 2, 0],     # a NaN score
                      [1, 0, -1, -1]])  # fine: k = 2, unused slots -1  # fmt: skip
    scores = np.ones_like(order, np.float32)
    scores[3, 2] = np.nan
    m = np.array([3, 4, 4, 4, 4])
    k = np.array([3, 4, 4, 4, 2])
    assert valid_lists(order, scores, m, k).tolist() == [True, False, False, False, True]
    scores[0, 0] = np.inf  # an infinite score in a used slot
    assert not valid_lists(order, scores, m, k)[0]


def test_extreme_user_features_give_an_invalid_result_not_a_repeated_item(
    tiny_bundle: tuple[Path, GenReranker],
) -> None:
    """float32-range features that overflow the network: NaN scores; greedy and beam both
    say so (RerankResult.valid) instead of handing back one candidate k times."""
    engine = open_engine(str(tiny_bundle[0]))
    cfg = engine.model_config
    rng = np.random.default_rng(0)
    static = rng.standard_normal((30, engine.d_model)).astype(np.float32)

    def request(user_value: float) -> RerankRequest:
        return RerankRequest(upstream_score=np.zeros(30, np.float32), user_id=1, k=10,
                             user_dense=np.full(len(cfg.schema.user_dense), user_value,
                                                np.float32), static=static)  # fmt: skip

    for beam in (1, 3):
        sane, huge = engine.rerank([request(0.0), request(3e38)], beam=beam)
        assert sane.valid and len(set(sane.order.tolist())) == 10
        assert not huge.valid, (beam, huge.order, huge.scores)


def _take_in_turn(head: np.ndarray, blocked: np.ndarray, c: int) -> tuple[np.ndarray, ...]:
    """The reference: head j, in turn, takes argmax over what is still available."""
    blocked, B = blocked.copy(), len(head)
    order, scores = np.empty((B, c), np.int64), np.empty((B, c), np.float32)
    for j in range(c):
        s = head[:, j] + blocked
        order[:, j] = s.argmax(axis=1)
        scores[:, j] = s[np.arange(B), order[:, j]]
        blocked[np.arange(B), order[:, j]] = -np.inf
    return order, scores, blocked


@pytest.mark.parametrize("seed", range(5))
def test_the_heads_pick_in_turn_when_they_share_a_favourite(seed: int) -> None:
    """service/decoding.py's one-shot pick per pass equals heads taking turns: shared
    favourites (identical heads), ties (rounded scores), rows that run out."""
    rng = np.random.default_rng(seed)
    B, n, M = 6, 4, 9
    head = np.round(rng.standard_normal((B, n, M)), 1).astype(np.float32)  # ties
    head[0] = head[0, 0]  # four heads with one favourite
    head[1, 1] = head[1, 0]  # two of them
    blocked = np.where(rng.random((B, M)) < 0.3, -np.inf, 0).astype(np.float32)
    blocked[2, 2:] = -np.inf  # two candidates left for four heads
    blocked[3] = -np.inf  # nothing left
    for c in range(1, n + 1):
        want_order, want_scores, want_blocked = _take_in_turn(head, blocked, c)
        order, scores = np.zeros((B, c + 1), np.int64), np.zeros((B, c + 1), np.float32)
        got_blocked = blocked.copy()
        picks = _take(head, got_blocked, order, scores, 1, c, np.arange(B)[:, None])
        np.testing.assert_array_equal(order[:, 1:], picks)
        np.testing.assert_array_equal(scores[:, 1:], want_scores)
        np.testing.assert_array_equal(got_blocked, want_blocked)
        live = np.isfinite(want_scores)  # a head with nothing left: any blocked pick, -inf
        np.testing.assert_array_equal(picks[live], want_order[live])
