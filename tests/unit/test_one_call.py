"""greedy.onnx (export/greedy.py): the whole greedy decode in one onnxruntime call gives the
multi-call path's lists and scores exactly and torch's lists; the engine takes it only
when its measured cost fits the deadline; bundles without it still serve."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from contract.bundle import load_bundle
from export.build import build_bundle
from export.config import ExportConfig
from model.decode import greedy_decode
from model.network import GenReranker
from service.engine import Engine, EngineConfig, EngineError, RerankRequest, open_engine
from tests.support.bundle import BUNDLE_CFG as CFG
from tests.support.bundle import make_checkpoint
from tests.support.inputs import random_inputs, requests_of

N = CFG.omtp_heads


@pytest.fixture(scope="module")
def engine(tiny_bundle: tuple[Path, GenReranker]) -> Engine:
    return open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu"))


def _both(engine: Engine, requests: list[RerankRequest]) -> tuple[list, list]:
    one = engine.rerank(requests, items_per_pass=N, one_call=True)
    multi = engine.rerank(requests, items_per_pass=N, one_call=False)
    return one, multi


@pytest.mark.parametrize(
    ("ms", "ks"),
    [
        ([30], [10]),  # batch 1, k not a multiple of n
        ([30], [12]),  # k a multiple of n
        ([7], [7]),  # k = m
        ([9, 25, 3, 25], [9, 10, 3, 16]),  # batch > 1, padded rows, k = m, mixed k
        ([200, 120, 57], [50, 31, 50]),  # long lists, rows that run out (k > m)
        ([5, 40], [4, 40]),  # k = n + 1 (one decoder pass), k = m = 40
    ],
)
def test_one_call_equals_multi_call_and_torch(
    engine: Engine, tiny_bundle: tuple[Path, GenReranker], ms: list[int], ks: list[int]
) -> None:
    model = tiny_bundle[1]
    assert engine.one_call
    for seed in range(3):
        inp = random_inputs(ms, seed=seed)
        requests = requests_of(model, inp, ks)
        one, multi = _both(engine, requests)
        ref = greedy_decode(model, inp, k=max(ks), items_per_pass=N).order
        for b, (o, mc) in enumerate(zip(one, multi, strict=True)):
            assert np.array_equal(o.order, mc.order), (b, o.order, mc.order)
            assert np.array_equal(o.scores, mc.scores), (b, o.scores, mc.scores)
            assert o.passes == mc.passes and o.valid and mc.valid
            assert np.array_equal(o.order, ref[b, : min(ks[b], ms[b])].numpy())
            assert o.timings.encode_s == 0.0 or max(ks) <= N  # it did take the one call


def test_one_call_flags_overflowing_features_invalid_as_multi_call(engine: Engine) -> None:
    """Features that overflow the network (NaN scores): the one-call list is invalid
    exactly when the multi-call one is (RerankResult.valid), never a repeated item."""
    cfg = engine.model_config
    rng = np.random.default_rng(0)
    static = rng.standard_normal((30, engine.d_model)).astype(np.float32)
    reqs = [
        RerankRequest(upstream_score=np.zeros(30, np.float32), user_id=1, k=10,
                      user_dense=np.full(len(cfg.schema.user_dense), v, np.float32),
                      static=static)
        for v in (0.0, 3e38)
    ]  # fmt: skip
    one, multi = _both(engine, reqs)
    assert [r.valid for r in one] == [r.valid for r in multi] == [True, False]
    assert np.array_equal(one[0].order, multi[0].order)


def _request(engine: Engine, deadline: float | None) -> RerankRequest:
    rng = np.random.default_rng(1)
    return RerankRequest(
        upstream_score=rng.standard_normal(30).astype(np.float32),
        user_id=3,
        user_dense=np.zeros(len(engine.model_config.schema.user_dense), np.float32),
        k=10,
        static=rng.standard_normal((30, engine.d_model)).astype(np.float32),
        deadline=deadline,
    )


def test_one_call_only_when_its_measured_cost_fits_the_deadline(
    tiny_bundle: tuple[Path, GenReranker],
) -> None:
    engine = open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu"))
    # no deadline: the one call
    assert engine.rerank([_request(engine, None)])[0].timings.encode_s == 0.0
    engine = open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu"))
    # a deadline and no measurement yet: the multi-call path (its deadline step applies)
    far = _request(engine, time.perf_counter() + 60.0)
    assert engine.rerank([far])[0].timings.encode_s > 0.0
    engine.rerank([_request(engine, None)], one_call=True)  # now measured
    far = _request(engine, time.perf_counter() + 60.0)
    assert engine.rerank([far])[0].timings.encode_s == 0.0
    # a budget shorter than the measured one call: multi-call, the list completed early
    tight = engine.rerank([_request(engine, time.perf_counter() + 1e-6)])[0]
    assert tight.timings.encode_s > 0.0 and tight.completed_early
    # the measurement at more passes bounds fewer passes (k = 7: one decoder pass)
    short = replace(_request(engine, time.perf_counter() + 60.0), k=7)
    assert engine.rerank([short])[0].timings.encode_s == 0.0


def test_warmup_measures_the_one_call(tiny_bundle: tuple[Path, GenReranker]) -> None:
    engine = open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu"))
    engine.warmup(batch_sizes=(1,), k=10)
    far = _request(engine, time.perf_counter() + 60.0)
    assert engine.rerank([far])[0].timings.encode_s == 0.0


def test_beam_and_fewer_items_per_pass_stay_multi_call(engine: Engine) -> None:
    r = _request(engine, None)
    assert engine.rerank([r], items_per_pass=1)[0].timings.encode_s > 0.0
    assert engine.rerank([r], beam=2)[0].timings.encode_s > 0.0


def test_bundle_without_greedy_graph_serves_multi_call(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """An older bundle (no greedy.onnx in its manifest or directory) loads and serves the
    same lists through the multi-call path."""
    dst = tmp_path / tiny_bundle[0].name
    shutil.copytree(tiny_bundle[0], dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["graphs"]["fp32"]["greedy"]["file"] == "greedy.onnx"
    assert "sha256" in manifest["files"]["greedy.onnx"]
    del manifest["graphs"]["fp32"]["greedy"], manifest["files"]["greedy.onnx"]
    (dst / "greedy.onnx").unlink()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    assert not load_bundle(dst).has_graph("greedy")
    old = open_engine(str(dst), EngineConfig(device="cpu"))
    assert not old.one_call
    r = _request(old, None)
    assert old.rerank([r])[0].timings.encode_s > 0.0
    with pytest.raises(EngineError, match=r"no greedy\.onnx"):
        old.rerank([r], one_call=True)
    new = open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu"))
    assert np.array_equal(old.rerank([r])[0].order, new.rerank([r])[0].order)


def test_greedy_graph_is_checked_like_the_others(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """greedy.onnx is a manifest file: a changed byte is refused at load."""
    dst = tmp_path / tiny_bundle[0].name
    shutil.copytree(tiny_bundle[0], dst)
    data = bytearray((dst / "greedy.onnx").read_bytes())
    data[-1] ^= 1
    (dst / "greedy.onnx").write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"greedy\.onnx: sha256 mismatch"):
        load_bundle(dst)


def test_one_call_of_a_plain_ops_bundle(tmp_path: Path) -> None:
    """greedy.onnx composed from the plain-op graphs (--no-fused-ops): the same lists."""
    model = make_checkpoint(tmp_path / "ckpt", seed=3)
    path = build_bundle(tmp_path / "ckpt", tmp_path / "artifacts",
                        ExportConfig(label="plain", fused_ops=False))  # fmt: skip
    engine = open_engine(str(path), EngineConfig(device="cpu"))
    assert engine.one_call
    ms, ks = [30, 12, 57], [10, 12, 25]
    inp = random_inputs(ms, seed=5)
    one, multi = _both(engine, requests_of(model, inp, ks))
    ref = greedy_decode(model, inp, k=max(ks), items_per_pass=N).order
    for b, (o, mc) in enumerate(zip(one, multi, strict=True)):
        assert np.array_equal(o.order, mc.order) and np.array_equal(o.scores, mc.scores)
        assert np.array_equal(o.order, ref[b, : min(ks[b], ms[b])].numpy())


def test_greedy_graph_kernel_budget(tiny_bundle: tuple[Path, GenReranker], tmp_path: Path) -> None:
    """At this model size a kernel's fixed cost is most of its time, so the kernels that
    onnxruntime runs (its optimized model) are the decode's cost: the tiny bundle (two
    layers each side, n = 3) runs at most 105 outside the Loop and 47 per decoder pass
    (the q/k/v of the self-attention one Split, the query and MLP biases inside the
    fused ops, the step embedding inside the first LayerNorm, the picks carried in the
    loop state, the loop condition passed through; before these, 128 and 60)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(tiny_bundle[0] / "greedy.onnx"), opts,
                         providers=["CPUExecutionProvider"])  # fmt: skip
    graph = onnx.load(opts.optimized_model_filepath).graph
    (body,) = [a.g for node in graph.node for a in node.attribute
               if a.type == onnx.AttributeProto.GRAPH]  # fmt: skip
    assert len(graph.node) <= 105, len(graph.node)
    assert len(body.node) <= 47, [node.op_type for node in body.node]
