"""What the engine's stages take and give (service/engine.py): its configuration, a
request and its result, and the batch as it passes from prepare to encode to decode. Plain
data, no onnxruntime calls; the engine, the batcher (service/rerank.py) and the parity
check (export/verify.py) share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from contract.features import HashedItems
from service.ort_sessions import OPT_LEVELS


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
        if self.optimization not in OPT_LEVELS:
            raise ValueError(f"optimization={self.optimization!r}: {sorted(OPT_LEVELS)}")
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
