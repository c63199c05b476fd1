"""The onnxruntime decode engine: a batch of rerank requests -> ordered lists (numpy + ORT).

Stages (each callable and timeable alone, infinity-style):
  prepare      requests -> one padded batch: candidates padded to a bucket (8, 16, 32, 64,
               ...), masked; cache-miss rows embedded by item_tower.onnx in ONE run (embed);
  encode       encoder.onnx once per batch: z, bos and every layer's cross keys/values,
               and (bundles exported with first_pass) the first decoder pass, at BOS,
               folded into the same call: its head scores and KV cache;
  decode       decoder.onnx once per pass with the KV cache (gpt-fast's decode_n_tokens):
               each pass emits up to `items_per_pass` items, head j taking the best
               candidate not yet chosen; masking is numpy, vectorized over the batch;
  post         per-request lists, scores, passes, timings.

Device path (EngineConfig.io_binding, default on with CUDA, off on CPU): the encoder's
outputs (z, bos, cross keys/values) and every pass's present KV stay as OrtValues on the
session's device and are bound (onnxruntime IO binding) as the next pass's inputs; per pass
only the tokens go host -> device and only the head scores (B, n, M) come back for the
numpy selection. On CPU it gives the same lists bit for bit (tests/unit/
test_engine_iobinding.py) but costs a few microseconds of binding calls per pass, so the
plain session.run path stays the CPU default. Beam search always takes the host path: its
KV cache is re-gathered on the host after every pass (kv[src]), which an OrtValue cannot do.

CUDA graphs are not used (the CUDA provider's enable_cuda_graph stays off). A captured
graph replays fixed shapes at fixed addresses, but the decoder's past KV grows by the
tokens of every pass (B, nh, P, hd) -> (B, nh, P + T, hd): one capture per (batch size,
candidate bucket, pass position, items per pass), each pinning its own buffers, which is
impractical; and deadline steps end rows early. It would need a decoder exported with a
fixed-size KV buffer (max_steps, written at `start`, masked by position), gpt-fast style.

The decode loop reproduces model.decode.greedy_decode (the torch reference, checked by
`python -m export verify`), including its deadline step: when the next pass would overrun
the deadline (estimated from the last pass), the rest of the list comes from head 0's last
scores in one sort and the result says completed_early. Requests with different k share
the batch: greedy lists are prefix-stable, so each request keeps the first min(k, m) items.

No torch here (a test imports this module in a fresh interpreter and checks sys.modules).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from contract.bundle import (
    FIRST_SCORES,
    Bundle,
    BundleError,
    cross_names,
    first_names,
    load_bundle,
    past_names,
)
from contract.config import ModelConfig
from contract.features import HashedItems

log = logging.getLogger(__name__)

_ORT_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    ort_state.Fail,
    ort_state.InvalidProtobuf,
    ort_state.InvalidGraph,
    ort_state.InvalidArgument,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class EngineError(ValueError):
    """A request the engine cannot run (shape, k or m out of the model's range)."""


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda (auto: CUDA when onnxruntime-gpu sees a GPU)
    precision: str = "auto"  # auto | fp32 | fp16 (auto: fp16 on CUDA if the bundle has it)
    intra_op_threads: int = 1  # batch-1 decode is latency-bound: one thread, no spinning
    inter_op_threads: int = 1
    candidate_buckets: tuple[int, ...] = (8, 16, 32, 64, 128, 256)  # padded M; + max_candidates
    optimization: str = "all"  # ORT graph optimization level
    default_items_per_pass: int | None = None  # None = n (every OMTP head)
    io_binding: str = "auto"  # auto | on | off (auto: on with CUDA, off on CPU)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: auto | cpu | cuda")
        if self.precision not in ("auto", "fp32", "fp16"):
            raise ValueError(f"precision={self.precision!r}: auto | fp32 | fp16")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 = onnxruntime's default)")
        if not self.candidate_buckets or any(b < 1 for b in self.candidate_buckets):
            raise ValueError(f"candidate_buckets={self.candidate_buckets}: positive sizes")
        if self.optimization not in _OPT_LEVELS:
            raise ValueError(f"optimization={self.optimization!r}: {sorted(_OPT_LEVELS)}")
        if self.io_binding not in ("auto", "on", "off"):
            raise ValueError(f"io_binding={self.io_binding!r}: auto | on | off")


@dataclass(frozen=True)
class RerankRequest:
    """One request, candidates in upstream order. Ids are hashed buckets (contract.features).

    static: (m, d) float32 cached static embeddings; rows where `missing` is True (or all
    rows, when static is None) are computed by the item tower from `items`."""

    upstream_score: np.ndarray  # (m,) float32
    user_id: int  # hashed bucket
    user_dense: np.ndarray  # (Fu,) float32
    k: int
    static: np.ndarray | None = None  # (m, d) float32
    missing: np.ndarray | None = None  # (m,) bool, True = embed this row with the item tower
    items: HashedItems | None = None  # (m,), (m, Fc), (m, Fd): needed for missing rows
    deadline: float | None = None  # time.perf_counter() value; None = no deadline

    @property
    def m(self) -> int:
        return int(self.upstream_score.shape[0])


@dataclass(frozen=True)
class StageTimings:
    """Seconds spent by the batch this request was in (shared by the batch)."""

    embed_s: float
    encode_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.embed_s + self.encode_s + self.decode_s


@dataclass(frozen=True)
class RerankResult:
    order: np.ndarray  # (min(k, m),) int64 candidate indices, best first, no repeats
    scores: np.ndarray  # (min(k, m),) float32 the choosing head's raw score
    passes: int  # decoder passes this list needed (or ran, when completed early)
    completed_early: bool  # the deadline step sorted this list's tail by head 0
    timings: StageTimings
    embedded: np.ndarray | None = None  # (missing rows, d) computed here, for cache write-back
    # False: the model's output for this request was not a list (non-finite scores, e.g.
    # from extreme feature values; see valid_lists): order/scores must not be served
    valid: bool = True


@dataclass
class PaddedBatch:
    """Encoder inputs of a batch, candidates padded to a bucket."""

    static: np.ndarray  # (B, M, d) float32
    upstream_score: np.ndarray  # (B, M) float32
    cand_mask: np.ndarray  # (B, M) bool
    user_id: np.ndarray  # (B,) int64
    user_dense: np.ndarray  # (B, Fu) float32
    m: np.ndarray  # (B,) int64 real candidates
    k: np.ndarray  # (B,) int64 min(k, m): list length per request
    embedded: list[np.ndarray | None] = field(default_factory=list)
    embed_s: float = 0.0


@dataclass
class EncodedBatch:
    """Encoder outputs, as the decoder's per-batch feeds (z, bos, cand_mask, cross.*), and
    the first (BOS) pass when the encoder graph folds it in: (head scores (B, n, M), its
    present KV per layer (B, nh, 1, hd))."""

    feeds: dict[str, np.ndarray]
    cand_mask: np.ndarray  # (B, M) bool
    first: tuple[np.ndarray, list[np.ndarray]] | None = None


@dataclass
class DeviceBatch:
    """Encoder outputs kept on the session's device (the IO-binding path): z, bos, cross.*
    and cand_mask as OrtValues, bound once as the decoder's per-batch inputs."""

    values: dict[str, ort.OrtValue]
    cand_mask: np.ndarray  # (B, M) bool, host copy for the numpy selection
    first_scores: np.ndarray | None = None  # the folded BOS pass's head scores, on the host
    first_kv: list[ort.OrtValue] = field(default_factory=list)  # and its KV, on the device


@dataclass
class Decoded:
    order: np.ndarray  # (B, K) int64, -1 where nothing was left
    scores: np.ndarray  # (B, K) float32, -inf at -1 slots
    passes: int  # passes run
    early_at: np.ndarray  # (B,) list length when the row's deadline step ran; -1 = never
    row_passes: np.ndarray  # (B,) passes each row took part in


CUDA_DEVICE_ID = 0
# CUDA provider options for low-latency decode: copies on the compute stream (no
# cross-stream sync per pass), no cuDNN algorithm search (the graphs have no convolutions;
# a search would only slow the first run of every shape), no TF32 (fp32 graphs keep fp32
# parity with the torch reference; fp16 graphs are unaffected). enable_cuda_graph stays
# off: see the module docstring.
CUDA_OPTIONS = {
    "device_id": str(CUDA_DEVICE_ID),
    "do_copy_in_default_stream": "1",
    "cudnn_conv_algo_search": "DEFAULT",
    "use_tf32": "0",
    "enable_cuda_graph": "0",
}
Provider = str | tuple[str, dict[str, str]]


def _providers(device: str) -> list[Provider]:
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise EngineError(f"device=cuda but onnxruntime has no CUDA provider ({available})")
    if device != "cpu" and has_cuda:
        return [("CUDAExecutionProvider", dict(CUDA_OPTIONS)), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Engine:
    """ONNX sessions of one bundle and the decode loop. Reentrant: per-call buffers only;
    the shared caches (empty KV, BOS tokens, start positions) are read-only."""

    def __init__(self, bundle: Bundle, config: EngineConfig | None = None) -> None:
        self.bundle = bundle
        self.config = config = config or EngineConfig()
        cfg: ModelConfig = bundle.model_config
        self.model_config = cfg
        self.heads = cfg.omtp_heads
        self.d_model = cfg.d_model
        self.layers = cfg.dec_layers
        providers = _providers(config.device)
        on_cuda = providers[0] != "CPUExecutionProvider"
        if config.precision == "auto":
            self.precision = "fp16" if on_cuda and "fp16" in bundle.precisions else "fp32"
        else:
            self.precision = config.precision
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = config.intra_op_threads
        opts.inter_op_num_threads = config.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = _OPT_LEVELS[config.optimization]
        opts.log_severity_level = 3  # warnings from ORT's graph passes are noise here
        self._item_tower = self._session("item_tower", opts, providers)
        self.providers = self._item_tower.get_providers()
        if on_cuda and "CUDAExecutionProvider" not in self.providers:
            # onnxruntime-gpu lists the CUDA provider whenever it is installed; without a
            # GPU or the CUDA / cuDNN libraries its sessions fall back to the CPU
            if config.device == "cuda":  # asked for by name: not a silent CPU engine
                raise EngineError(
                    "device=cuda but the CUDA provider did not start (no GPU, or the "
                    f"CUDA / cuDNN libraries did not load): sessions got {self.providers}"
                )
            log.warning("CUDA provider present but unusable: running on CPU")
            if config.precision == "auto" and self.precision == "fp16":
                self.precision = "fp32"
                self._item_tower = self._session("item_tower", opts, providers)
        self._encoder = self._session("encoder", opts, providers)
        self._decoder = self._session("decoder", opts, providers)
        self._run_decoder = _fast_run(self._decoder)
        self._run_encoder = _fast_run(self._encoder)
        buckets = sorted({b for b in config.candidate_buckets if b < cfg.max_candidates})
        self.buckets = (*buckets, cfg.max_candidates)
        self._past_names = past_names(self.layers)
        self._cross_names = cross_names(self.layers)
        # what the decoder takes from the encoder; a first_pass bundle's encoder also
        # returns the BOS pass (FIRST_SCORES + first.*), older bundles' do not
        self._carried = ["z", "bos", *self._cross_names]
        self._encoder_outputs = list(bundle.graph("encoder", self.precision).outputs)
        self._first_names = first_names(self.layers)
        self.first_pass = FIRST_SCORES in self._encoder_outputs
        if self.first_pass and self._encoder_outputs != [
            *self._carried,
            FIRST_SCORES,
            *self._first_names,
        ]:
            raise BundleError(f"encoder outputs {self._encoder_outputs}: not a known layout")
        self._decoder_outputs = list(bundle.graph("decoder", self.precision).outputs)
        # the IO-binding path: OrtValues live on `device` (the decoder session's)
        self.device = "cuda" if "CUDAExecutionProvider" in self._decoder.get_providers() else "cpu"
        self.io_binding = config.io_binding == "on" or (
            config.io_binding == "auto" and self.device == "cuda"
        )
        if self.io_binding and not binding_internals(self._decoder):
            log.warning("onnxruntime %s: no IO binding internals; IO binding off", ort.__version__)
            self.io_binding = False
        kv_type = next(i.type for i in self._decoder.get_inputs() if i.name == "z")
        self._kv_dtype = _NP_DTYPES[kv_type]
        self._head_dim = cfg.d_model // cfg.n_attn_heads
        # read-only caches, filled on first use per batch size (warm-up fills them)
        self._empty_past: dict[int, list[np.ndarray]] = {}
        self._empty_device_past: dict[int, list[ort.OrtValue]] = {}
        self._bos: dict[int, np.ndarray] = {}
        self._rows: dict[int, np.ndarray] = {}
        self._starts = [np.array([s], np.int64) for s in range(cfg.max_steps)]
        self._device_starts = [self._to_device(s) for s in self._starts] if self.io_binding else []
        log.info(
            "engine %s: providers %s, precision %s, io binding %s, threads intra=%d inter=%d, "
            "buckets %s",
            bundle.version, self.providers, self.precision, self.io_binding,
            config.intra_op_threads, config.inter_op_threads, self.buckets,
        )  # fmt: skip

    @property
    def version(self) -> str:
        return self.bundle.version

    def _session(
        self, graph: str, opts: ort.SessionOptions, providers: list[Provider]
    ) -> ort.InferenceSession:
        spec = self.bundle.graph(graph, self.precision)
        path = self.bundle.path / spec.file
        try:
            session = ort.InferenceSession(
                self.bundle.files[spec.file], sess_options=opts, providers=providers
            )
        except _ORT_ERRORS as e:
            raise BundleError(f"{path}: corrupted ONNX, onnxruntime cannot load it: {e}") from e
        names = (
            tuple(i.name for i in session.get_inputs()),
            tuple(o.name for o in session.get_outputs()),
        )
        if names != (spec.inputs, spec.outputs):
            raise BundleError(f"{path}: graph inputs/outputs {names} differ from the manifest")
        return session

    # ---- stage: embed (item tower) -----------------------------------------------------

    def embed_items(
        self, item_id: np.ndarray, item_cat: np.ndarray, item_dense: np.ndarray
    ) -> np.ndarray:
        """Hashed item features (N,), (N, Fc), (N, Fd) -> static embeddings (N, d) float32."""
        feeds = {
            "item_id": np.ascontiguousarray(item_id, dtype=np.int64),
            "item_cat": np.ascontiguousarray(item_cat, dtype=np.int64),
            "item_dense": np.ascontiguousarray(item_dense, dtype=np.float32),
        }
        out: np.ndarray = self._item_tower.run(["static"], feeds)[0]
        return out

    # ---- stage: prepare ----------------------------------------------------------------

    def bucket(self, m: int) -> int:
        for b in self.buckets:
            if m <= b:
                return b
        raise EngineError(f"{m} candidates: the model takes at most {self.buckets[-1]}")

    def _check(self, i: int, r: RerankRequest) -> None:
        cfg, m = self.model_config, r.m
        if r.upstream_score.ndim != 1 or not 1 <= m <= cfg.max_candidates:
            raise EngineError(f"request {i}: m={m} candidates, want 1..{cfg.max_candidates}")
        if not 1 <= r.k <= cfg.max_steps:
            raise EngineError(f"request {i}: k={r.k}, want 1..{cfg.max_steps}")
        if r.user_dense.shape != (len(cfg.schema.user_dense),):
            raise EngineError(f"request {i}: user_dense shape {r.user_dense.shape}")
        if r.static is not None and r.static.shape != (m, cfg.d_model):
            raise EngineError(f"request {i}: static {r.static.shape}, want ({m}, {cfg.d_model})")
        if r.missing is not None and r.missing.shape != (m,):
            raise EngineError(f"request {i}: missing {r.missing.shape}, want ({m},)")
        needs_items = r.static is None or (r.missing is not None and bool(r.missing.any()))
        if needs_items and (r.items is None or r.items.item_id.shape != (m,)):
            raise EngineError(f"request {i}: missing static embeddings and no item features")

    def prepare(self, requests: Sequence[RerankRequest]) -> PaddedBatch:
        """Pad to one candidate bucket; embed every missing row of the batch in one run."""
        if not requests:
            raise EngineError("empty batch")
        for i, r in enumerate(requests):
            self._check(i, r)
        B, d = len(requests), self.d_model
        m = np.array([r.m for r in requests], np.int64)
        M = self.bucket(int(m.max()))
        static = np.zeros((B, M, d), np.float32)
        score = np.zeros((B, M), np.float32)
        mask = np.arange(M)[None, :] < m[:, None]  # (B, M)
        todo: list[tuple[int, np.ndarray]] = []  # (request, its candidate rows to embed)
        for b, r in enumerate(requests):
            score[b, : r.m] = r.upstream_score
            if r.static is None:
                todo.append((b, np.arange(r.m)))
            else:
                static[b, : r.m] = r.static
                if r.missing is not None:
                    todo.append((b, np.flatnonzero(r.missing)))
        batch = PaddedBatch(
            static=static,
            upstream_score=score,
            cand_mask=mask,
            user_id=np.array([r.user_id for r in requests], np.int64),
            user_dense=np.stack([r.user_dense for r in requests]).astype(np.float32),
            m=m,
            k=np.minimum([r.k for r in requests], m),
            embedded=[None] * B,
        )
        todo = [(b, rows) for b, rows in todo if len(rows)]
        if todo:
            t0 = time.perf_counter()
            parts = [(requests[b].items, rows) for b, rows in todo]
            emb = self.embed_items(
                np.concatenate([it.item_id[rows] for it, rows in parts if it is not None]),
                np.concatenate([it.item_cat[rows] for it, rows in parts if it is not None]),
                np.concatenate([it.item_dense[rows] for it, rows in parts if it is not None]),
            )
            at = 0
            for b, rows in todo:
                batch.static[b, rows] = emb[at : at + len(rows)]
                batch.embedded[b] = emb[at : at + len(rows)]
                at += len(rows)
            batch.embed_s = time.perf_counter() - t0
        return batch

    # ---- stage: encode -----------------------------------------------------------------

    def encode(self, batch: PaddedBatch) -> EncodedBatch:
        outs = self._run_encoder(
            self._encoder_outputs,
            {
                "static": batch.static,
                "upstream_score": batch.upstream_score,
                "cand_mask": batch.cand_mask,
                "user_id": batch.user_id,
                "user_dense": batch.user_dense,
            },
        )
        named = dict(zip(self._encoder_outputs, outs, strict=True))
        feeds = {name: named[name] for name in self._carried}
        feeds["cand_mask"] = batch.cand_mask
        first = None
        if self.first_pass:
            first = (named[FIRST_SCORES], [named[name] for name in self._first_names])
        return EncodedBatch(feeds=feeds, cand_mask=batch.cand_mask, first=first)

    def encode_on_device(self, batch: PaddedBatch) -> DeviceBatch:
        """encode, its outputs left on the session's device (the IO-binding path)."""
        binding = self._encoder.io_binding()
        binding.bind_cpu_input("static", batch.static)
        binding.bind_cpu_input("upstream_score", batch.upstream_score)
        binding.bind_cpu_input("cand_mask", batch.cand_mask)
        binding.bind_cpu_input("user_id", batch.user_id)
        binding.bind_cpu_input("user_dense", batch.user_dense)
        for name in self._encoder_outputs:  # the first pass's scores come to the host
            binding.bind_output(name, "cpu" if name == FIRST_SCORES else self.device,
                                CUDA_DEVICE_ID)  # fmt: skip
        self._encoder.run_with_iobinding(binding)
        named = dict(zip(self._encoder_outputs, binding.get_outputs(), strict=True))
        values = {name: named[name] for name in self._carried}
        values["cand_mask"] = self._to_device(batch.cand_mask)
        if not self.first_pass:
            return DeviceBatch(values=values, cand_mask=batch.cand_mask)
        return DeviceBatch(
            values=values,
            cand_mask=batch.cand_mask,
            first_scores=named[FIRST_SCORES].numpy(),
            first_kv=[named[name] for name in self._first_names],
        )

    def _to_device(self, x: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(x), self.device, CUDA_DEVICE_ID
        )

    # ---- stage: decode -----------------------------------------------------------------

    def empty_past(self, B: int) -> list[np.ndarray]:
        """(B, nh, 0, hd) keys and values per layer: the first pass's past."""
        if B not in self._empty_past:
            shape = (B, self.model_config.n_attn_heads, 0, self._head_dim)
            empty = np.zeros(shape, self._kv_dtype)
            self._empty_past[B] = [empty] * len(self._past_names)
        return self._empty_past[B]

    def empty_device_past(self, B: int) -> list[ort.OrtValue]:
        """empty_past as host OrtValues for the IO binding (zero bytes: nothing to copy;
        the session moves them to its device as it would a numpy feed)."""
        if B not in self._empty_device_past:
            empty = ort.OrtValue.ortvalue_from_numpy(self.empty_past(B)[0])
            self._empty_device_past[B] = [empty] * len(self._past_names)
        return self._empty_device_past[B]

    def _bos_tokens(self, B: int) -> np.ndarray:
        if B not in self._bos:
            self._bos[B] = np.full((B, 1), -1, np.int64)
            self._rows[B] = np.arange(B)
        return self._bos[B]

    def decode_pass(
        self, enc: EncodedBatch, tokens: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder pass. tokens (B, T) int64 (BOS = -1 at position 0), past per layer
        (B, nh, P, hd) -> head scores at the last position (B, n, M), present (P + T)."""
        feeds = enc.feeds
        feeds["tokens"] = tokens
        feeds["start"] = self._starts[past[0].shape[2]]
        for name, kv in zip(self._past_names, past, strict=True):
            feeds[name] = kv
        outs = self._run_decoder(self._decoder_outputs, feeds)
        return outs[0], outs[1:]

    def device_passes(self, enc: DeviceBatch) -> DevicePasses:
        """The decoder's IO binding for one batch (see DevicePasses)."""
        return DevicePasses(self, enc)

    def greedy(
        self,
        enc: EncodedBatch | DeviceBatch,
        k: np.ndarray,
        items_per_pass: int,
        deadlines: np.ndarray | None,
        first_pass_s: float = 0.0,
    ) -> Decoded:
        """OMTP greedy decoding for the whole batch (greedy_decode's loop). k (B,) list
        lengths; deadlines (B,) perf_counter values (inf = none) or None. Each request has
        its own deadline: before a pass, the rows whose deadline a pass as long as the last
        one would overrun get their tail from head 0's last scores (the deadline step) and
        leave the loop; the others go on, so a tight budget never cuts its batch-mates.
        A DeviceBatch (encode_on_device) decodes with the KV cache bound on the device.
        When the encoder ran the first pass, its scores are taken as the first pass's and
        `first_pass_s` (the encoder call's time, an overestimate) stands for that pass's
        time in the first deadline check."""
        B, M = enc.cand_mask.shape
        K = int(k.max())
        p, tokens = items_per_pass, self._bos_tokens(B)
        row_start = self._rows[B] * M  # (B,): flat offset of each row, for put/take
        # blocked: 0 = available, -inf = chosen or padding; head + blocked is the masked score
        blocked = np.where(enc.cand_mask, np.float32(0), np.float32(-np.inf))  # (B, M)
        s = np.empty_like(blocked)  # (B, M) work buffer
        order = np.empty((B, K), np.int64)
        scores = np.empty((B, K), np.float32)
        early_at = np.full(B, -1, np.int64)  # list length when a row's deadline step ran
        early_passes = np.zeros(B, np.int64)  # passes a row that left early took part in
        # the earliest deadline of a row still decoding: one float compare per pass
        first = float(deadlines.min()) if deadlines is not None else math.inf
        finished: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # rows, order, scores
        bound = self.device_passes(enc) if isinstance(enc, DeviceBatch) else None
        host = cast(EncodedBatch, enc)  # read only when bound is None
        past, head = self.empty_past(B), None
        # the first pass when the encoder ran it: head scores (+ its KV on the host path)
        folded: tuple[np.ndarray, list[np.ndarray]] | None = None
        if isinstance(enc, DeviceBatch):
            folded = None if enc.first_scores is None else (enc.first_scores, [])
        else:
            folded = enc.first
        chosen = passes = 0
        last_pass_s = first_pass_s
        live = np.ones(B, bool)  # rows still decoding
        while chosen < K:
            now = time.perf_counter()
            if head is not None and deadlines is not None and now + last_pass_s > first:
                late = live & (k > chosen) & (now + last_pass_s > deadlines)
                if late.any():
                    rows = np.flatnonzero(late)
                    o, sc = order[rows], scores[rows]  # copies
                    self._complete(head[rows, 0], blocked[rows], o, sc, chosen)
                    finished.append((rows, o, sc))
                    early_at[rows], early_passes[rows], live[rows] = chosen, passes, False
                    going = live & (k > chosen)
                    if not going.any():
                        break
                    first = float(deadlines[going].min())
            t0 = time.perf_counter()
            timed = folded is None  # a folded pass keeps first_pass_s as its estimate
            if folded is not None:  # the encoder's BOS pass (its KV bound already, if bound)
                (head, kv), folded = folded, None
                past = kv or past
            elif bound is None:
                head, past = self.decode_pass(host, tokens, past)  # (B, n, M)
            else:
                head = bound.step(tokens)  # (B, n, M), the KV cache stays on the device
            passes += 1
            c = min(p, K - chosen)
            for j in range(chosen, chosen + c):  # head j - chosen: best not yet chosen
                np.add(head[:, j - chosen], blocked, out=s)
                idx = s.argmax(axis=1)  # (B,) ties: lowest index, as torch
                order[:, j] = idx
                flat = row_start + idx  # (B,) into the (B * M) buffers: one C call each
                scores[:, j] = s.take(flat)
                blocked.put(flat, -np.inf)
            tokens = order[:, chosen : chosen + c].copy()  # (B, c): raw argmax, as torch
            chosen += c
            if timed:
                last_pass_s = time.perf_counter() - t0
        for rows, o, sc in finished:  # the rows that left early keep their completed lists
            order[rows], scores[rows] = o, sc
        order[:, chosen:][early_at < 0] = -1  # rows that never needed these slots
        scores[:, chosen:][early_at < 0] = -np.inf
        order[scores == -np.inf] = -1  # a request with fewer than K candidates ran out
        # a row that ran to its end took part in the passes its k needed
        full = np.minimum(passes, -(-k // p))  # ceil(k / p)
        row_passes = np.where(early_at >= 0, early_passes, full)
        return Decoded(order, scores, passes, early_at, row_passes)

    @staticmethod
    def _complete(
        head0: np.ndarray, blocked: np.ndarray, order: np.ndarray, scores: np.ndarray, at: int
    ) -> None:
        """The deadline step: slots at.. get the best still-available candidates by head 0,
        in one stable sort (greedy_decode's _complete)."""
        s = head0 + blocked  # (B, M)
        top = np.argsort(-s, axis=1, kind="stable")[:, : order.shape[1] - at]
        order[:, at:] = top  # -inf slots (nothing left) become -1 in the caller
        scores[:, at:] = np.take_along_axis(s, top, axis=1)

    # ---- the whole request path --------------------------------------------------------

    def rerank(
        self,
        requests: Sequence[RerankRequest],
        *,
        items_per_pass: int | None = None,
        deadline: float | None = None,
        beam: int = 1,
    ) -> list[RerankResult]:
        """Rerank a batch. items_per_pass: 1..n (default: the config's, else n).
        Deadlines are per request (RerankRequest.deadline); `deadline`, a
        time.perf_counter() value, caps them all. beam > 1: beam search (one item per pass,
        head 0, as model.decode.beam_decode; its groups stop at their earliest deadline)."""
        p = items_per_pass if items_per_pass is not None else self.config.default_items_per_pass
        p = self.heads if p is None else p
        if not 1 <= p <= self.heads:
            raise EngineError(f"items_per_pass={p}, want 1..{self.heads}")
        if beam < 1:
            raise EngineError(f"beam={beam}, want >= 1")
        batch = self.prepare(requests)
        limit = np.inf if deadline is None else deadline
        deadlines = np.array(
            [limit if r.deadline is None else min(r.deadline, limit) for r in requests]
        )
        t0 = time.perf_counter()
        # beam re-gathers its KV cache on the host every pass: it takes the host path
        enc = self.encode_on_device(batch) if self.io_binding and beam == 1 else self.encode(batch)
        t1 = time.perf_counter()
        if beam == 1:
            limits = deadlines if np.isfinite(deadlines).any() else None
            dec = self.greedy(enc, batch.k, p, limits, first_pass_s=t1 - t0)
        else:
            assert isinstance(enc, EncodedBatch)
            limits = deadlines if np.isfinite(deadlines).any() else None
            dec = self.beam(enc, batch.k, beam, limits, t1 - t0)
            p = 1
        t2 = time.perf_counter()
        timings = StageTimings(embed_s=batch.embed_s, encode_s=t1 - t0, decode_s=t2 - t1)
        valid = valid_lists(dec.order, dec.scores, batch.m, batch.k)
        results = []
        for b in range(len(requests)):
            kb = int(batch.k[b])
            results.append(
                RerankResult(
                    order=dec.order[b, :kb].copy(),
                    scores=dec.scores[b, :kb].copy(),
                    passes=int(dec.row_passes[b]),
                    completed_early=bool(dec.early_at[b] >= 0),
                    timings=timings,
                    embedded=batch.embedded[b],
                    valid=bool(valid[b]),
                )
            )
        return results

    # ---- beam search (the simpler path) ------------------------------------------------

    def beam(
        self,
        enc: EncodedBatch,
        k: np.ndarray,
        beam: int,
        deadlines: np.ndarray | None,
        first_pass_s: float = 0.0,
    ) -> Decoded:
        """Beam search per group of equal list length (a beam's best list of length k is
        not a prefix of the best of length k + 1, unlike greedy). deadlines (B,)
        perf_counter values (inf = none) or None: each request's own, as in greedy."""
        B = enc.cand_mask.shape[0]
        K = int(k.max())
        order = np.full((B, K), -1, np.int64)
        scores = np.full((B, K), -np.inf, np.float32)
        passes = 0
        early_at = np.full(B, -1, np.int64)
        row_passes = np.zeros(B, np.int64)
        for kk in np.unique(k):
            rows = np.flatnonzero(k == kk)
            names = [*self._carried, "cand_mask"]
            first = None
            if enc.first is not None:
                first = (enc.first[0][rows], [kv[rows] for kv in enc.first[1]])
            sub = EncodedBatch(
                feeds={name: enc.feeds[name][rows] for name in names},
                cand_mask=enc.cand_mask[rows],
                first=first,
            )
            group_deadlines = None if deadlines is None else deadlines[rows]
            dec = self._beam_group(sub, int(kk), beam, group_deadlines, first_pass_s)
            order[rows, :kk], scores[rows, :kk] = dec.order, dec.scores
            passes = max(passes, dec.passes)
            early_at[rows], row_passes[rows] = dec.early_at, dec.row_passes
        return Decoded(order, scores, passes, early_at, row_passes)

    def _beam_group(
        self,
        enc: EncodedBatch,
        K: int,
        W: int,
        deadlines: np.ndarray | None,
        first_pass_s: float,
    ) -> Decoded:
        """model.decode.beam_decode in numpy: B x W rows decode as one batch; beams ranked
        by summed masked log-probs of head 0; the KV cache follows the survivors. The
        encoder's BOS pass (enc.first), when there, is the first step's, its time taken as
        first_pass_s. Before a step, a request whose own deadline a step as long as the
        last one would overrun gets its best beam completed from head 0's last scores (the
        deadline step) and is frozen; the others go on, so a tight budget never cuts its
        batch-mates (they keep their beams; the frozen rows ride along until all stop)."""
        B, M = enc.cand_mask.shape
        names = [*self._carried, "cand_mask"]
        feeds: dict[str, Any] = {n: np.repeat(enc.feeds[n], W, axis=0) for n in names}
        wide = EncodedBatch(feeds=feeds, cand_mask=feeds["cand_mask"])
        blocked = np.where(wide.cand_mask, np.float32(0), np.float32(-np.inf))  # (B*W, M)
        total = np.full((B, W), -np.inf, np.float32)
        total[:, 0] = 0.0  # only beam 0 is live at the start
        total = total.reshape(B * W)
        stay = np.full(M, -np.inf, np.float32)
        stay[0] = 0.0  # an exhausted beam extends by "nothing" at no cost
        first = (np.arange(B) * W)[:, None]  # (B, 1): first row of each request
        hist = np.full((B * W, K), -1, np.int64)
        hist_scores = np.full((B * W, K), -np.inf, np.float32)
        tokens, past = self._bos_tokens(B * W), self.empty_past(B * W)
        last_pass_s, head0 = 0.0, None
        out_order = np.full((B, K), -1, np.int64)  # the rows frozen at their deadline
        out_scores = np.full((B, K), -np.inf, np.float32)
        early_at = np.full(B, -1, np.int64)
        live = np.ones(B, bool)
        earliest = math.inf if deadlines is None else float(deadlines.min())
        steps = K
        for step in range(K):
            now = time.perf_counter()
            if head0 is not None and deadlines is not None and now + last_pass_s > earliest:
                late = live & (now + last_pass_s > deadlines)
                if late.any():
                    rows = np.flatnonzero(late)
                    best = first[rows, 0] + total.reshape(B, W)[rows].argmax(axis=1)
                    order, sc = hist[best], hist_scores[best]  # copies
                    self._complete(head0[best], blocked[best], order, sc, step)
                    order[sc == -np.inf] = -1
                    out_order[rows], out_scores[rows] = order, sc
                    early_at[rows], live[rows] = step, False
                    if not live.any():
                        steps = step
                        break
                    earliest = float(deadlines[live].min())
            t0 = time.perf_counter()
            folded = step == 0 and enc.first is not None  # the encoder ran the BOS pass
            if folded:
                assert enc.first is not None
                head = np.repeat(enc.first[0], W, axis=0)
                past = [np.repeat(kv, W, axis=0) for kv in enc.first[1]]
            else:
                head, past = self.decode_pass(wide, tokens, past)
            head0 = head[:, 0]  # (B*W, M)
            exhausted: np.ndarray = np.all(blocked == -np.inf, axis=1)  # (B*W,)
            logp = _masked_log_softmax(head0, blocked)
            logp[exhausted] = stay
            cand = (total[:, None] + logp).reshape(B, W * M)
            top = np.argsort(-cand, axis=1, kind="stable")[:, :W]  # (B, W) best first
            total = np.take_along_axis(cand, top, axis=1).reshape(B * W)
            src = (first + top // M).reshape(B * W)  # surviving beam rows
            item = (top % M).reshape(B * W)
            past = [kv[src] for kv in past]
            blocked, dead = blocked[src], exhausted[src]
            hist, hist_scores, head0 = hist[src], hist_scores[src], head0[src]
            hist[:, step] = np.where(dead, -1, item)
            hist_scores[:, step] = np.where(dead, -np.inf, head0[np.arange(B * W), item])
            blocked[np.arange(B * W), item] = -np.inf
            tokens = item[:, None]
            last_pass_s = first_pass_s if folded else time.perf_counter() - t0
        if live.any():  # the rows that ran to the end: their best beam
            rows = np.flatnonzero(live)
            best = first[rows, 0] + total.reshape(B, W)[rows].argmax(axis=1)
            out_order[rows], out_scores[rows] = hist[best], hist_scores[best]
        row_passes = np.where(early_at >= 0, early_at, K)
        return Decoded(out_order, out_scores, steps, early_at, row_passes)

    # ---- warm-up -----------------------------------------------------------------------

    def warmup(
        self,
        batch_sizes: Sequence[int] = (1,),
        k: int = 10,
        items_per_pass: Sequence[int | None] = (None,),
        beam: int = 1,
    ) -> float:
        """Run every candidate bucket and batch size once per decoding (items per pass;
        the beam when > 1), so the first real request pays no allocation or
        kernel-selection cost. Returns the seconds it took."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        cfg = self.model_config
        for B in batch_sizes:
            for M in self.buckets:
                reqs = [
                    RerankRequest(
                        upstream_score=rng.standard_normal(M).astype(np.float32),
                        user_id=1,
                        user_dense=np.zeros(len(cfg.schema.user_dense), np.float32),
                        k=min(k, M, cfg.max_steps),
                        static=rng.standard_normal((M, self.d_model)).astype(np.float32),
                    )
                    for _ in range(B)
                ]
                for p in items_per_pass:
                    self.rerank(reqs, items_per_pass=p)
                if beam > 1:
                    self.rerank(reqs, beam=beam)
        seconds = time.perf_counter() - t0
        log.info("engine %s warmed up in %.2f s (buckets %s)", self.version, seconds, self.buckets)
        return seconds


class DevicePasses:
    """One batch's decoder passes with IO binding (gpt-fast's decode_one_token, on the
    device). The batch's z, bos, cand_mask and cross keys/values are bound once. A step
    binds the tokens (host -> device) and the start position (a device constant), runs,
    copies head_scores to the host, and binds the present KV (left on the device) as the
    next step's past. Per call, not shared.

    It drives onnxruntime's pybind objects directly (IOBinding._iobinding, OrtValue's
    C value, InferenceSession._sess), as _fast_run does: the public wrappers re-check
    every call for WebGPU graph capture, make an OrtDevice per bind_output and wrap every
    output: a visible share of a pass. Engine checks they exist (binding_internals) before it
    turns IO binding on."""

    def __init__(self, engine: Engine, enc: DeviceBatch) -> None:
        self._engine = engine
        self._run = engine._decoder._sess.run_with_iobinding
        self._binding = binding = engine._decoder.io_binding()._iobinding  # pybind object
        self._enc = enc  # a CPU OrtValue may be a view of a numpy array (cand_mask): keep it
        for name, value in enc.values.items():
            binding.bind_ortvalue_input(name, value._ortvalue)
        # the first step's past: the encoder's BOS pass KV when it ran that pass (the first
        # step is then the second pass), else (B, nh, 0, hd) empty, bound from the host
        past = enc.first_kv or engine.empty_device_past(enc.cand_mask.shape[0])
        for name, kv in zip(engine._past_names, past, strict=True):
            binding.bind_ortvalue_input(name, kv._ortvalue)
        self.position = 1 if enc.first_kv else 0  # tokens fed so far (the next start)
        self._device = ort.OrtDevice.make(engine.device, CUDA_DEVICE_ID)._get_c_device()
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._present = engine._decoder_outputs[1:]
        self._tokens: np.ndarray | None = None  # the same: the last step's tokens

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B, T) int64 -> head scores at the last position (B, n, M) on the host;
        the present KV stays on the device as the next step's past."""
        engine, binding = self._engine, self._binding
        self._tokens = tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        binding.bind_ortvalue_input(
            "tokens", ort_state.OrtValue.ortvalue_from_numpy(tokens, self._device)
        )
        binding.bind_ortvalue_input("start", engine._device_starts[self.position]._ortvalue)
        binding.bind_output("head_scores", self._cpu)
        for name in self._present:  # fresh outputs: their length P + T grows every pass
            binding.bind_output(name, self._device)
        self._run(binding, None)
        outs = binding.get_outputs()
        for i, name in enumerate(engine._past_names, start=1):
            binding.bind_ortvalue_input(name, outs[i])  # the binding keeps its own reference
        self.position += tokens.shape[1]
        head: np.ndarray = outs[0].numpy()  # a view that owns a reference to its tensor
        return head

    def present(self) -> list[ort.OrtValue]:
        """The last step's present KV (the next step's past), where it lives."""
        outs = self._binding.get_outputs()
        return [ort.OrtValue(outs[i]) for i in range(1, len(outs))]


def binding_internals(session: ort.InferenceSession) -> bool:
    """Does this onnxruntime have the pybind objects DevicePasses drives?"""
    try:
        binding = session.io_binding()._iobinding
        value = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32))._ortvalue
        ort.OrtDevice.make("cpu", 0)._get_c_device()
    except (AttributeError, TypeError):
        return False
    calls = ("bind_ortvalue_input", "bind_output", "get_outputs")
    return (
        all(callable(getattr(binding, c, None)) for c in calls)
        and callable(getattr(getattr(session, "_sess", None), "run_with_iobinding", None))
        and callable(getattr(ort_state.OrtValue, "ortvalue_from_numpy", None))
        and callable(getattr(value, "numpy", None))
    )


RunFn = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]


def _fast_run(session: ort.InferenceSession) -> RunFn:
    """session.run without its per-call re-validation of the feed names (a visible share of
    a decode pass): the names were checked against the manifest when the session was made.
    Falls back to the public run() if the binding is not where it has always been."""
    inner = getattr(session, "_sess", None)
    if inner is None or not callable(getattr(inner, "run", None)):
        return session.run

    def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = inner.run(names, feeds, None)
        return out

    return run


def valid_lists(order: np.ndarray, scores: np.ndarray, m: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(B,) bool: row b's first k[b] slots are distinct candidates of its m[b], each with
    a finite score. A NaN or infinite score (an item or user feature so large that the
    network overflows) breaks the argmax: the same candidate, or a padding slot, would be
    chosen again and again. One vectorized check per batch, a few microseconds."""
    K = order.shape[1]
    used = np.arange(K)[None, :] < k[:, None]  # (B, K) the slots each list has
    fine = (order >= 0) & (order < m[:, None]) & np.isfinite(scores)
    ok = ~(used & ~fine).any(axis=1)
    # distinct: unused slots get distinct negative fillers, then sorted neighbours differ
    filled = np.sort(np.where(used, order, -1 - np.arange(K)[None, :]), axis=1)
    return ok & ~(filled[:, 1:] == filled[:, :-1]).any(axis=1)


def _masked_log_softmax(scores: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """log softmax over available candidates (blocked == 0), -inf elsewhere; a row with
    nothing available stays finite before the fill (as model.losses.masked_log_softmax)."""
    filled = np.where(blocked == 0, scores, np.finfo(scores.dtype).min)
    shifted = filled - filled.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return np.where(blocked == 0, logp, -np.inf).astype(np.float32)


def open_engine(bundle_dir: str, config: EngineConfig | None = None) -> Engine:
    """load_bundle (every sha256 checked; the item table verified, not loaded) + Engine
    (sessions from the verified bytes)."""
    return Engine(load_bundle(bundle_dir, item_table=False), config)
