"""The IO-binding decode path of service/engine.py (EngineConfig.io_binding).

On CPU (always run): the bound path keeps the encoder outputs and the KV cache as
OrtValues and must give the SAME lists, scores, passes and deadline steps as the plain
session.run path, bit for bit, for mixed batches (different m and k), every items-per-pass,
deadlines, and beam (which always takes the host path). On a GPU (only where onnxruntime
has the CUDA execution provider; skipped, saying so, elsewhere): parity of the CUDA
engine with the torch reference and with the CPU engine, fp32 and fp16, and the KV cache
kept on the device."""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import service.decoding as decoding_module
import service.engine as engine_module
from export.verify import ParityConfig, run_parity
from model.decode import beam_decode, greedy_decode
from model.network import GenReranker
from service.engine import (
    DeviceBatch,
    EncodedBatch,
    Engine,
    EngineConfig,
    EngineError,
    RerankRequest,
    RerankResult,
    open_engine,
)
from service.settings import Settings
from tests.support.bundle import BUNDLE_CFG as CFG
from tests.support.inputs import random_inputs, requests_of

N = CFG.omtp_heads
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
NO_CUDA = (
    "GPU path not tested here: onnxruntime has no CUDAExecutionProvider "
    f"(providers {ort.get_available_providers()}; the CPU build, or no GPU)"
)


@pytest.fixture(scope="module")
def unbound(tiny_bundle: tuple[Path, GenReranker]) -> Engine:
    return open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu", io_binding="off"))


@pytest.fixture(scope="module")
def bound(tiny_bundle: tuple[Path, GenReranker]) -> Engine:
    return open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu", io_binding="on"))


@pytest.fixture
def model(tiny_bundle: tuple[Path, GenReranker]) -> GenReranker:
    return tiny_bundle[1]


def assert_same(a: list[RerankResult], b: list[RerankResult]) -> None:
    """Bit-identical lists: orders, scores (exact), passes, deadline steps."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.order, y.order)
        np.testing.assert_array_equal(x.scores, y.scores)
        assert x.passes == y.passes and x.completed_early == y.completed_early


class FakeClock:
    """perf_counter that advances 1 s per call: the deadline steps fall on the same pass
    in both paths, whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    clock = FakeClock()
    fake = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(engine_module, "time", fake)
    monkeypatch.setattr(decoding_module, "time", fake)
    yield clock


# ---- the switch ----------------------------------------------------------------------


def test_auto_is_off_on_cpu_and_on_forces_it(
    tiny_bundle: tuple[Path, GenReranker],
    unbound: Engine,
    bound: Engine,
) -> None:
    auto = open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu"))
    assert auto.device == "cpu" and not auto.io_binding  # the tuned session.run path
    assert bound.io_binding and bound.device == "cpu"
    assert not unbound.io_binding
    with pytest.raises(ValueError, match="io_binding"):
        EngineConfig(io_binding="yes")


def test_an_onnxruntime_without_the_binding_internals_runs_unbound(
    tiny_bundle: tuple[Path, GenReranker],
    bound: Engine,
    model: GenReranker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert engine_module.binding_internals(bound.decoder)  # this onnxruntime has them
    monkeypatch.setattr(engine_module, "binding_internals", lambda session: False)
    plain = open_engine(str(tiny_bundle[0]), EngineConfig(device="cpu", io_binding="on"))
    assert not plain.io_binding  # said in the log; the host path serves
    reqs = requests_of(model, random_inputs([12, 5], seed=26), [6, 6])
    assert_same(plain.rerank(reqs), bound.rerank(reqs))


def test_a_listed_cuda_provider_that_does_not_start_is_refused_by_name(
    tiny_bundle: tuple[Path, GenReranker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """onnxruntime-gpu lists CUDA even where it cannot start; its sessions then run on the
    CPU. device=cuda must not quietly become a CPU engine (a GPU benchmark would report CPU
    figures); device=auto falls back, fp32."""
    listed = [*ort.get_available_providers(), "CUDAExecutionProvider"]
    monkeypatch.setattr(engine_module.ort, "get_available_providers", lambda: listed)
    if HAS_CUDA:
        pytest.skip("CUDA is really here: nothing to simulate")
    with pytest.raises(EngineError, match="did not start"):
        open_engine(str(tiny_bundle[0]), EngineConfig(device="cuda"))
    auto = open_engine(str(tiny_bundle[0]), EngineConfig(device="auto"))
    assert auto.providers[0] == "CPUExecutionProvider" and auto.precision == "fp32"


def test_the_setting(
    tiny_bundle: tuple[Path, GenReranker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RERANK_BUNDLE", str(tiny_bundle[0]))
    assert Settings().io_binding == "auto"
    monkeypatch.setenv("RERANK_IO_BINDING", "on")
    assert Settings().io_binding == "on"
    monkeypatch.setenv("RERANK_IO_BINDING", "sometimes")
    with pytest.raises(ValueError, match="io_binding"):
        Settings()


# ---- CPU: bound == unbound, bit for bit ----------------------------------------------


@pytest.mark.parametrize("p", [1, 2, N])
def test_mixed_batch_is_bit_identical(
    bound: Engine, unbound: Engine, model: GenReranker, p: int
) -> None:
    inp = random_inputs([12, 30, 5, 64, 130, 1], seed=10 + p)
    ks = [7, 10, 5, 20, 40, 3]  # k > m for two rows: they run out
    reqs = requests_of(model, inp, ks)
    on, off = bound.rerank(reqs, items_per_pass=p), unbound.rerank(reqs, items_per_pass=p)
    assert_same(on, off)
    ref = greedy_decode(model, inp, k=max(ks), items_per_pass=p)
    for b, res in enumerate(on):  # and both are the torch reference's lists
        kb = min(ks[b], int(inp.cand_mask[b].sum()))
        np.testing.assert_array_equal(res.order, ref.order[b, :kb].numpy())
        assert res.passes == math.ceil(kb / p) and not res.completed_early


def test_missing_embeddings_and_a_batch_of_one(
    bound: Engine, unbound: Engine, model: GenReranker
) -> None:
    inp = random_inputs([15, 8], seed=21)
    cached = requests_of(model, inp, [6, 6])
    half = [RerankRequest(**{**r.__dict__, "missing": np.arange(r.m) % 2 == 0}) for r in cached]
    assert_same(bound.rerank(half), unbound.rerank(half))
    assert_same(bound.rerank(cached[:1]), unbound.rerank(cached[:1]))


def test_deadlines_in_the_past_are_bit_identical(
    bound: Engine, unbound: Engine, model: GenReranker
) -> None:
    inp = random_inputs([40, 9, 25], seed=22)
    reqs = requests_of(model, inp, [12, 9, 2])
    assert_same(bound.rerank(reqs, deadline=0.0), unbound.rerank(reqs, deadline=0.0))
    late = [reqs[0], RerankRequest(**{**reqs[1].__dict__, "deadline": 0.0}), reqs[2]]
    on, off = bound.rerank(late), unbound.rerank(late)
    assert_same(on, off)
    assert on[1].completed_early and not on[0].completed_early


def test_per_request_deadlines_mid_decode_are_bit_identical(
    bound: Engine, unbound: Engine, model: GenReranker, fake_clock: FakeClock
) -> None:
    """Rows leave the loop at different passes (deterministic clock): the bound path
    completes the same rows at the same pass from the same scores."""
    inp = random_inputs([60, 45, 30, 50], seed=23)
    base = requests_of(model, inp, [30, 30, 20, 25])
    results = []
    for engine in (bound, unbound):
        fake_clock.now = 0.0
        # one tick per perf_counter call: pass j's deadline check reads 3j - 1 (j >= 2)
        # and adds the last pass (1 s): rows are cut after 2, 4, never and 3 passes
        reqs = [
            RerankRequest(**{**r.__dict__, "deadline": d})
            for r, d in zip(base, [7.5, 13.5, None, 10.5], strict=True)
        ]
        results.append(engine.rerank(reqs, items_per_pass=1))
    on, off = results
    assert_same(on, off)
    assert [r.completed_early for r in on] == [True, True, False, True]
    assert len({r.passes for r in on}) == 4  # each row stopped at its own pass
    for r in on:
        assert len(set(r.order.tolist())) == len(r.order)


def test_beam_takes_the_host_path(bound: Engine, unbound: Engine, model: GenReranker) -> None:
    inp = random_inputs([20, 20, 11], seed=24)
    reqs = requests_of(model, inp, [8, 8, 8])
    on = bound.rerank(reqs, beam=3)
    assert_same(on, unbound.rerank(reqs, beam=3))
    ref = beam_decode(model, inp, k=8, beam=3)
    for b, res in enumerate(on):
        np.testing.assert_array_equal(res.order, ref.order[b].numpy())
    mixed = requests_of(model, inp, [8, 5, 8])
    assert_same(
        bound.rerank(mixed, beam=3, deadline=0.0), unbound.rerank(mixed, beam=3, deadline=0.0)
    )


def test_the_bound_stages_keep_the_kv_cache_as_ortvalues(bound: Engine, model: GenReranker) -> None:
    """encode_on_device + DevicePasses.step == encode + decode_pass, pass by pass; the KV
    cache is OrtValues on the session's device ('cpu' here), growing by each pass. The
    encoder's folded BOS pass: its scores come to the host, its KV is the first step's past."""
    inp = random_inputs([10, 4], seed=25)
    batch = bound.prepare(requests_of(model, inp, [6, 6]))
    dev, host = bound.encode_on_device(batch), bound.encode(batch)
    assert isinstance(dev, DeviceBatch) and isinstance(host, EncodedBatch)
    for name, value in dev.values.items():
        assert value.device_name() == bound.device == "cpu"
        np.testing.assert_array_equal(value.numpy(), host.feeds[name])
    assert host.first is not None and dev.first_scores is not None
    np.testing.assert_array_equal(dev.first_scores, host.first[0])
    for kv, ref in zip(dev.first_kv, host.first[1], strict=True):
        assert kv.device_name() == "cpu"
        np.testing.assert_array_equal(kv.numpy(), ref)
    passes, past = bound.passes(dev), host.first[1]
    assert passes.position == 1  # the BOS pass ran in the encoder
    for step, t in enumerate([1, 2, 3]):
        tokens = np.arange(step, step + t, dtype=np.int64)[None].repeat(2, axis=0)
        head = passes.step(tokens)
        want, past = bound.decode_pass(host, tokens, past)
        assert isinstance(head, np.ndarray)
        np.testing.assert_array_equal(head, want)
        assert passes.position == past[0].shape[2]
        for kv, ref in zip(passes.present(), past, strict=True):
            assert isinstance(kv, ort.OrtValue) and kv.device_name() == "cpu"
            np.testing.assert_array_equal(kv.numpy(), ref)
    assert bound.warmup(batch_sizes=(1, 3), k=5) > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bound_equals_unbound_at_each_precision(
    tiny_bundle: tuple[Path, GenReranker],
    model: GenReranker,
    precision: str,
) -> None:
    """The fp16 graphs (what a GPU serves by default) through the bound path on the CPU:
    fp16 KV OrtValues, position after the folded BOS pass, bit-identical lists."""
    path = str(tiny_bundle[0])
    on = open_engine(path, EngineConfig(device="cpu", precision=precision, io_binding="on"))
    off = open_engine(path, EngineConfig(device="cpu", precision=precision, io_binding="off"))
    assert on.io_binding and on.precision == precision
    reqs = requests_of(model, random_inputs([12, 30, 5, 64], seed=40), [7, 10, 5, 20])
    for p in (1, N):
        assert_same(on.rerank(reqs, items_per_pass=p), off.rerank(reqs, items_per_pass=p))
    late = [reqs[0], RerankRequest(**{**reqs[1].__dict__, "deadline": 0.0}), *reqs[2:]]
    assert_same(on.rerank(late), off.rerank(late))
    passes = on.passes(on.encode_on_device(on.prepare(reqs[:2])))
    p0 = passes.position  # 1: the encoder ran the BOS pass
    passes.step(np.array([[0], [1]], np.int64))
    passes.step(np.array([[2, 3], [4, 5]], np.int64))
    assert passes.position == p0 + 3
    kv_type = "tensor(float16)" if precision == "fp16" else "tensor(float)"
    for kv in passes.present():
        assert kv.shape()[2] == p0 + 3 and kv.data_type() == kv_type


def test_parity_with_the_torch_reference_through_the_bound_path(
    bound: Engine, model: GenReranker
) -> None:
    report = run_parity(model, bound, ParityConfig(requests=60, seed=3))
    assert report.invalid == 0 and report.failures == 0 and report.passed, report.summary()


# ---- GPU: only where onnxruntime has the CUDA execution provider -----------------------


def open_cuda(bundle: Path, **config: Any) -> Engine:
    """A CUDA engine, or a skip saying why: onnxruntime-gpu lists the CUDA provider even
    where it cannot start (no GPU, CUDA / cuDNN libraries missing); the engine then refuses
    device=cuda."""
    try:
        return open_engine(str(bundle), EngineConfig(device="cuda", **config))
    except EngineError as e:
        pytest.skip(f"GPU path not tested here: {e}")


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
class TestCuda:
    @pytest.fixture(scope="class")
    def cuda32(self, tiny_bundle: tuple[Path, GenReranker]) -> Engine:
        return open_cuda(tiny_bundle[0], precision="fp32")

    @pytest.fixture(scope="class")
    def cuda16(self, tiny_bundle: tuple[Path, GenReranker]) -> Engine:
        return open_cuda(tiny_bundle[0])

    def test_cuda_sessions_bind_by_default(self, cuda32: Engine, cuda16: Engine) -> None:
        for engine in (cuda32, cuda16):
            assert engine.providers[0] == "CUDAExecutionProvider"
            assert engine.device == "cuda" and engine.io_binding  # auto: on with CUDA
        assert cuda32.precision == "fp32"
        assert cuda16.precision == "fp16"  # precision=auto: the bundle's fp16 graphs

    def test_kv_cache_stays_on_the_device(self, cuda16: Engine, model: GenReranker) -> None:
        batch = cuda16.prepare(requests_of(model, random_inputs([10, 30], seed=30), [6, 6]))
        enc = cuda16.encode_on_device(batch)
        assert {v.device_name() for v in enc.values.values()} == {"cuda"}
        passes = cuda16.passes(enc)
        p0 = passes.position  # 1: the encoder ran the BOS pass (0 for an unfolded bundle)
        head = passes.step(np.array([[0], [1]], np.int64))
        assert isinstance(head, np.ndarray) and head.shape == (2, N, 32)
        assert head.dtype == np.float32  # fp16 graphs: head scores still come back fp32
        passes.step(np.array([[2, 3], [4, 5]], np.int64))
        assert passes.position == p0 + 3
        assert {kv.device_name() for kv in passes.present()} == {"cuda"}
        assert passes.present()[0].shape()[2] == p0 + 3

    def test_fp32_parity_with_torch(self, cuda32: Engine, model: GenReranker) -> None:
        report = run_parity(model, cuda32, ParityConfig(requests=100, seed=4))
        assert report.invalid == 0 and report.passed, report.summary()

    def test_fp16_parity_with_torch(self, cuda16: Engine, model: GenReranker) -> None:
        report = run_parity(model, cuda16, ParityConfig.for_precision("fp16", requests=100))
        assert report.invalid == 0 and report.passed, report.summary()

    @pytest.mark.parametrize("precision", ["fp32", "fp16"])
    def test_cuda_lists_match_the_cpu_engine(
        self,
        tiny_bundle: tuple[Path, GenReranker],
        unbound: Engine,
        model: GenReranker,
        precision: str,
    ) -> None:
        cuda = open_cuda(tiny_bundle[0], precision=precision)
        cpu = unbound
        if precision == "fp16":
            cpu = open_engine(
                str(tiny_bundle[0]), EngineConfig(device="cpu", precision="fp16", io_binding="off")
            )
        atol = ParityConfig.for_precision(precision).atol
        inp = random_inputs([12, 30, 5, 64, 130, 1], seed=31)
        ks = [7, 10, 5, 20, 40, 3]
        reqs = requests_of(model, inp, ks)
        on_gpu, on_cpu = cuda.rerank(reqs), cpu.rerank(reqs)
        same = sum(np.array_equal(g.order, c.order) for g, c in zip(on_gpu, on_cpu, strict=True))
        if precision == "fp32":
            assert same >= len(reqs) - 1, "near-ties may flip one list, not more"
        for g, c in zip(on_gpu, on_cpu, strict=True):
            assert g.passes == c.passes and len(g.order) == len(c.order)
            n = int(np.argmax(g.order != c.order)) if not np.array_equal(g.order, c.order) else None
            # up to the first difference the lists agree with scores within the tolerance;
            # where they part, the two choices were a near-tie (fp16 on CUDA computes in
            # fp16, the CPU provider upcasts many fp16 nodes): their scores are that close
            np.testing.assert_allclose(g.scores[:n], c.scores[:n], atol=atol)
            if n is not None:
                assert abs(float(g.scores[n]) - float(c.scores[n])) <= 2 * atol

    def test_unbound_cuda_path_agrees_with_the_bound_one(
        self,
        tiny_bundle: tuple[Path, GenReranker],
        cuda16: Engine,
        model: GenReranker,
    ) -> None:
        plain = open_engine(str(tiny_bundle[0]), replace(cuda16.config, io_binding="off"))
        assert not plain.io_binding
        reqs = requests_of(model, random_inputs([40, 9, 25], seed=32), [12, 9, 2])
        for a, b in zip(cuda16.rerank(reqs), plain.rerank(reqs), strict=True):
            np.testing.assert_array_equal(a.order, b.order)
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-3)
