"""The onnxruntime rerank engine: a batch of rerank requests -> ordered lists.

Stages (each callable and timeable alone, infinity-style):
  prepare      requests -> one padded batch: candidates padded to a bucket (8, 16, 32, 64,
               ...), masked; cache-miss rows embedded by item_tower.onnx in ONE run;
  encode       encoder.onnx once per batch: z, bos and every layer's cross keys/values,
               and (bundles exported with first_pass) the first decoder pass, at BOS,
               folded into the same call: its head scores and KV cache;
  decode       decoder.onnx once per pass with the KV cache: service/decoding.py's greedy
               (n items per pass) or beam loop over the passes of service/ort_sessions.py
               (host numpy KV, or IO binding with the KV on the device);
  post         per-request lists, scores, passes, timings.
  one call     (bundles with greedy.onnx, fp32 on the host) encode + the whole greedy
               decode at n items per pass in ONE onnxruntime call (export/greedy.py): no
               Python between passes. Chosen per batch when its measured cost fits the
               tightest remaining budget (`_one_call_fits`); otherwise the multi-call path
               above, whose per-pass deadline step can end a list early.

IO binding (EngineConfig.io_binding, default on with CUDA, off on CPU) gives the same
lists bit for bit on CPU (tests/unit/test_engine_iobinding.py) but costs binding calls per
pass there, so plain session.run stays the CPU default. Beam search always takes the host
path: its KV cache is re-gathered by surviving beam after every pass.

No torch here (a test imports this module in a fresh interpreter and checks sys.modules).
One idea, kept in one module at its size: the engine's stages (prepare, encode, the two
decode call paths, post, warm-up) over one bundle's sessions. What they take and pass along
(the config, requests, results and batches) is in engine_types.py, the decode loops in
decoding.py and the session plumbing in ort_sessions.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnxruntime as ort

from contract.bundle import (
    FIRST_SCORES,
    GREEDY_OUTPUTS,
    Bundle,
    BundleError,
    cross_names,
    first_names,
    load_bundle,
    past_names,
)
from contract.config import ModelConfig
from service.decoding import Deadlines, Decoded, beam, greedy, valid_lists
from service.engine_types import (
    DeviceBatch,
    EncodedBatch,
    EngineConfig,
    EngineError,
    PaddedBatch,
    RerankRequest,
    RerankResult,
    StageTimings,
)
from service.ort_sessions import (
    CUDA_DEVICE_ID,
    NP_DTYPES,
    DevicePasses,
    HostPasses,
    NoCudaError,
    binding_internals,
    fast_run,
    open_session,
    providers_for,
    session_options,
)

log = logging.getLogger(__name__)


class Engine:
    """ONNX sessions of one bundle and the decode loop. Reentrant: per-call buffers only;
    the shared caches (empty KV, BOS tokens, start positions) are read-only."""

    def __init__(self, bundle: Bundle, config: EngineConfig | None = None) -> None:
        self.bundle = bundle
        self.config = config = config or EngineConfig()
        cfg: ModelConfig = bundle.model_config
        self.model_config = cfg
        self.heads, self.d_model, self.layers = cfg.omtp_heads, cfg.d_model, cfg.dec_layers
        self._open_sessions()
        buckets = sorted({b for b in config.candidate_buckets if b < cfg.max_candidates})
        self.buckets = (*buckets, cfg.max_candidates)
        self._read_graph_layout()
        # the IO-binding path: OrtValues live on `device` (the decoder session's)
        self.device = "cuda" if "CUDAExecutionProvider" in self.decoder.get_providers() else "cpu"
        self.io_binding = config.io_binding == "on" or (
            config.io_binding == "auto" and self.device == "cuda"
        )
        if self.io_binding and not binding_internals(self.decoder):
            log.warning("onnxruntime %s: no IO binding internals; IO binding off", ort.__version__)
            self.io_binding = False
        # read-only caches, filled on first use per batch size (warm-up fills them)
        self._empty_past: dict[int, list[np.ndarray]] = {}
        self._empty_device_past: dict[int, list[ort.OrtValue]] = {}
        self._starts = [np.array([s], np.int64) for s in range(cfg.max_steps)]
        self._trips = [np.array(p, np.int64) for p in range(cfg.max_steps + 1)]
        # the one-call graph's measured seconds per (batch, bucket, passes): its deadline rule
        self._one_call_s: dict[tuple[int, int, int], float] = {}
        self._one_call_bound: dict[tuple[int, int], list[float]] = {}
        self._max_trips = -(-cfg.max_steps // self.heads)
        self.device_starts = [self._to_device(s) for s in self._starts] if self.io_binding else []
        log.info(
            "engine %s: providers %s, precision %s, io binding %s, threads intra=%d inter=%d, "
            "buckets %s",
            bundle.version, self.providers, self.precision, self.io_binding,
            config.intra_op_threads, config.inter_op_threads, self.buckets,
        )  # fmt: skip

    def _open_sessions(self) -> None:
        """The three sessions on the configured device, in the precision it runs: fp16 on
        CUDA when the bundle has it (precision auto), else fp32. A CUDA provider that
        does not start is an error when device=cuda was asked for by name, else the CPU."""
        bundle, config = self.bundle, self.config
        try:
            providers = providers_for(config.device)
        except NoCudaError as e:
            raise EngineError(str(e)) from e
        on_cuda = providers[0] != "CPUExecutionProvider"
        auto_fp16 = on_cuda and "fp16" in bundle.precisions
        self.precision = ("fp16" if auto_fp16 else "fp32") if config.precision == "auto" else (
            config.precision)  # fmt: skip
        opts = session_options(
            config.intra_op_threads, config.inter_op_threads, config.optimization
        )
        self._item_tower = open_session(bundle, "item_tower", self.precision, opts, providers)
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
                self._item_tower = open_session(
                    bundle, "item_tower", self.precision, opts, providers
                )
        self._encoder = open_session(bundle, "encoder", self.precision, opts, providers)
        self.decoder = open_session(bundle, "decoder", self.precision, opts, providers)
        self._run_decoder = fast_run(self.decoder)
        self._run_encoder = fast_run(self._encoder)
        # the one-call greedy graph: fp32 bundles that have it, host path (IO binding off)
        self._run_greedy = None
        if bundle.has_graph("greedy", self.precision) and not self._binding_wanted():
            greedy_session = open_session(bundle, "greedy", self.precision, opts, providers)
            self._run_greedy = fast_run(greedy_session)

    def _binding_wanted(self) -> bool:
        c = self.config
        on_cuda = "CUDAExecutionProvider" in self._encoder.get_providers()
        return c.io_binding == "on" or (c.io_binding == "auto" and on_cuda)

    def _read_graph_layout(self) -> None:
        """The encoder's and decoder's input/output names, from the manifest: what the
        decoder takes from the encoder, and whether the encoder also runs the BOS pass
        (FIRST_SCORES + first.*: first_pass bundles; older bundles' encoders do not)."""
        bundle, cfg = self.bundle, self.model_config
        self.past_names = past_names(self.layers)
        self._carried = ["z", "bos", *cross_names(self.layers)]
        self._encoder_outputs = list(bundle.graph("encoder", self.precision).outputs)
        self._first_names = first_names(self.layers)
        self.first_pass = FIRST_SCORES in self._encoder_outputs
        folded = [*self._carried, FIRST_SCORES, *self._first_names]
        if self.first_pass and self._encoder_outputs != folded:
            raise BundleError(f"encoder outputs {self._encoder_outputs}: not a known layout")
        self.decoder_outputs = list(bundle.graph("decoder", self.precision).outputs)
        kv_type = next(i.type for i in self.decoder.get_inputs() if i.name == "z")
        self._kv_dtype = NP_DTYPES[kv_type]
        self._head_dim = cfg.d_model // cfg.n_attn_heads

    @property
    def version(self) -> str:
        return self.bundle.version

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
            self._embed_missing(requests, batch, todo)
        return batch

    def _embed_missing(
        self,
        requests: Sequence[RerankRequest],
        batch: PaddedBatch,
        todo: list[tuple[int, np.ndarray]],
    ) -> None:
        """The item tower over every (request, candidate rows) in todo, in one run; the rows
        go into batch.static and, for the cache write-back, batch.embedded."""
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
            self._empty_past[B] = [empty] * len(self.past_names)
        return self._empty_past[B]

    def empty_device_past(self, B: int) -> list[ort.OrtValue]:
        """empty_past as host OrtValues for the IO binding (zero bytes: nothing to copy;
        the session moves them to its device as it would a numpy feed)."""
        if B not in self._empty_device_past:
            empty = ort.OrtValue.ortvalue_from_numpy(self.empty_past(B)[0])
            self._empty_device_past[B] = [empty] * len(self.past_names)
        return self._empty_device_past[B]

    def decode_pass(
        self, enc: EncodedBatch, tokens: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder pass. tokens (B, T) int64 (BOS = -1 at position 0), past per layer
        (B, nh, P, hd) -> head scores at the last position (B, n, M), present (P + T)."""
        feeds = enc.feeds
        feeds["tokens"] = tokens
        feeds["start"] = self._starts[past[0].shape[2]]
        for name, kv in zip(self.past_names, past, strict=True):
            feeds[name] = kv
        outs = self._run_decoder(self.decoder_outputs, feeds)
        return outs[0], outs[1:]

    def passes(self, enc: EncodedBatch | DeviceBatch) -> HostPasses | DevicePasses:
        """The batch's decoder passes after the first (BOS) one when the encoder ran it,
        else from the first: on the device for a DeviceBatch, on the host otherwise."""
        if isinstance(enc, DeviceBatch):
            return DevicePasses(self, enc)
        past = enc.first[1] if enc.first is not None else self.empty_past(len(enc.cand_mask))
        return HostPasses(self, enc, past)

    def decode(
        self,
        enc: EncodedBatch | DeviceBatch,
        k: np.ndarray,
        items_per_pass: int,
        deadlines: np.ndarray | None = None,
        first_pass_s: float = 0.0,
        beam_width: int = 1,
    ) -> Decoded:
        """Greedy (beam_width 1, `items_per_pass` items per pass) or beam decoding of an
        encoded batch. k (B,) list lengths; deadlines (B,) perf_counter values (inf =
        none) or None; first_pass_s: the encoder call's time, the first deadline check's
        estimate of a pass when the encoder ran the BOS pass."""
        if beam_width == 1:
            first = enc.first_scores if isinstance(enc, DeviceBatch) else (
                None if enc.first is None else enc.first[0])  # fmt: skip
            clock = Deadlines(deadlines, first_pass_s)
            return greedy(self.passes(enc), first, enc.cand_mask, k, items_per_pass, clock)
        if isinstance(enc, DeviceBatch):
            raise EngineError("beam search takes the host path: encode, not encode_on_device")

        def widen(rows: np.ndarray, W: int) -> tuple[HostPasses, np.ndarray | None]:
            # rows of the batch, each repeated W times: row b * W + w is beam w of b
            names = [*self._carried, "cand_mask"]
            wide = EncodedBatch(
                feeds={n: np.repeat(enc.feeds[n][rows], W, axis=0) for n in names},
                cand_mask=np.repeat(enc.cand_mask[rows], W, axis=0),
            )
            if enc.first is None:
                return HostPasses(self, wide, self.empty_past(len(rows) * W)), None
            past = [np.repeat(kv[rows], W, axis=0) for kv in enc.first[1]]
            return HostPasses(self, wide, past), np.repeat(enc.first[0][rows], W, axis=0)

        return beam(widen, enc.cand_mask, k, beam_width, deadlines, first_pass_s)

    # ---- stage: decode in one call (greedy.onnx) -----------------------------------------

    @property
    def one_call(self) -> bool:
        """Is the one-call greedy graph loaded (fp32 bundle with greedy.onnx, host path)?"""
        return self._run_greedy is not None

    def one_call_passes(self, K: int, items_per_pass: int) -> int:
        """The decoder passes after the BOS pass that greedy.onnx runs for lists of length
        K; 0 when it does not apply: no greedy graph, fewer than n items per pass, or
        K <= n (the encoder call, with its folded BOS pass, is then the whole decode)."""
        if self._run_greedy is None or items_per_pass != self.heads:
            return 0
        return max(-(-K // self.heads) - 1, 0)

    def decode_one_call(self, batch: PaddedBatch, passes: int) -> Decoded:
        """encode + the greedy decode at n items per pass, `passes` decoder passes after the
        BOS one, in ONE onnxruntime call (greedy.onnx); the same lists as encode + decode
        (tests/unit/test_one_call.py). No deadline step inside: the caller decides it fits
        (`_one_call_fits`). Its time is recorded for that rule."""
        B, M = batch.cand_mask.shape
        feeds = {
            "static": batch.static,
            "upstream_score": batch.upstream_score,
            "cand_mask": batch.cand_mask,
            "user_id": batch.user_id,
            "user_dense": batch.user_dense,
            "passes": self._trips[passes],
        }
        t0 = time.perf_counter()
        assert self._run_greedy is not None
        order, scores = self._run_greedy(GREEDY_OUTPUTS, feeds)
        self._record_one_call(B, M, passes, time.perf_counter() - t0)
        K = int(batch.k.max())
        order, scores = order[:, :K], scores[:, :K]
        order[scores == -np.inf] = -1  # a request with fewer than K candidates ran out
        run = passes + 1
        row_passes = np.minimum(run, -(-batch.k // self.heads))
        return Decoded(order, scores, run, np.full(B, -1, np.int64), row_passes)

    def _record_one_call(self, B: int, M: int, passes: int, seconds: float) -> None:
        """The measured cost of a one-call decode. bound[P]: the last measurement at P
        passes, else the least measured at more passes (an overestimate: a decode of more
        passes costs more), else inf (unknown)."""
        self._one_call_s[(B, M, passes)] = seconds
        bound = self._one_call_bound.setdefault((B, M), [math.inf] * (self._max_trips + 1))
        for P in range(passes, -1, -1):
            exact = self._one_call_s.get((B, M, P))
            bound[P] = exact if exact is not None else min(bound[P], seconds)

    def _one_call_fits(self, B: int, M: int, passes: int, deadlines: np.ndarray | None) -> bool:
        """The one-call path's deadline rule: no deadline, or the call's measured cost at
        this batch size, bucket and passes (_record_one_call; warm-up measures it) ends
        before the earliest deadline of the batch. Unmeasured: False, the multi-call path,
        whose per-pass deadline step completes a late list early instead."""
        if deadlines is None:
            return True
        bound = self._one_call_bound.get((B, M))
        cost = math.inf if bound is None else bound[passes]
        return time.perf_counter() + cost <= float(deadlines.min())

    # ---- the whole request path --------------------------------------------------------

    def rerank(
        self,
        requests: Sequence[RerankRequest],
        *,
        items_per_pass: int | None = None,
        deadline: float | None = None,
        beam: int = 1,
        one_call: bool | None = None,
    ) -> list[RerankResult]:
        """Rerank a batch. items_per_pass: 1..n (default: the config's, else n).
        Deadlines are per request (RerankRequest.deadline); `deadline`, a
        time.perf_counter() value, caps them all. beam > 1: beam search (one item per pass,
        head 0, as model.decode.beam_decode; its groups stop at their earliest deadline).
        Greedy at n items per pass decodes in one call (greedy.onnx) when the bundle has
        it and its measured cost fits the earliest deadline (one_call None, the default;
        True: whenever the graph applies, deadlines aside; False: never); else one
        onnxruntime call per pass with the per-pass deadline step."""
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
        limits = deadlines if np.isfinite(deadlines).any() else None
        passes = 0 if beam > 1 or one_call is False else self.one_call_passes(int(batch.k.max()), p)
        if one_call and passes == 0 and self._run_greedy is None:
            raise EngineError("one_call=True: this engine has no greedy.onnx (fp32, host path)")
        B, M = batch.cand_mask.shape
        t0 = time.perf_counter()
        if passes and (one_call or self._one_call_fits(B, M, passes, limits)):
            dec = self.decode_one_call(batch, passes)  # encode + decode: decode_s holds both
            timings = StageTimings(batch.embed_s, 0.0, time.perf_counter() - t0)
            return _results(batch, dec, timings)
        # beam re-gathers its KV cache on the host every pass: it takes the host path
        enc = self.encode_on_device(batch) if self.io_binding and beam == 1 else self.encode(batch)
        t1 = time.perf_counter()
        dec = self.decode(enc, batch.k, p, limits, t1 - t0, beam_width=beam)
        t2 = time.perf_counter()
        timings = StageTimings(embed_s=batch.embed_s, encode_s=t1 - t0, decode_s=t2 - t1)
        return _results(batch, dec, timings)

    # ---- warm-up -----------------------------------------------------------------------

    def _warm_one_call(self, reqs: list[RerankRequest], k: int) -> None:
        """Measure the one-call decode of this batch at 1, 2, 4, .. passes up to k's (twice
        each: the second, warm, time is the one kept), for its deadline rule."""
        if self._run_greedy is None:
            return
        top = self.one_call_passes(min(k, reqs[0].m, self.model_config.max_steps), self.heads)
        trips = sorted({*(1 << i for i in range(top.bit_length())), top} - {0})
        for P in trips:
            kp = min((P + 1) * self.heads, self.model_config.max_steps)
            batch = [replace(r, k=kp) for r in reqs]
            for _ in range(2):
                self.rerank(batch, items_per_pass=self.heads, one_call=True)

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
                self._warm_one_call(reqs, k)
                if beam > 1:
                    self.rerank(reqs, beam=beam)
        seconds = time.perf_counter() - t0
        log.info("engine %s warmed up in %.2f s (buckets %s)", self.version, seconds, self.buckets)
        return seconds


def _results(batch: PaddedBatch, dec: Decoded, timings: StageTimings) -> list[RerankResult]:
    """Each request's list (its first min(k, m) slots), passes and validity."""
    valid = valid_lists(dec.order, dec.scores, batch.m, batch.k)
    results = []
    for b, kb in enumerate(batch.k.tolist()):
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


def open_engine(bundle_dir: str, config: EngineConfig | None = None) -> Engine:
    """load_bundle (every sha256 checked; the item table verified, not loaded) + Engine
    (sessions from the verified bytes)."""
    return Engine(load_bundle(bundle_dir, item_table=False), config)
