"""onnxruntime sessions of a bundle and the two ways to run decoder passes over them.

- `open_session`: one graph of a verified bundle as an InferenceSession whose input and
  output names are checked against the manifest once, so the hot path can skip
  onnxruntime's per-call checks (`fast_run`).
- `HostPasses`: a batch's decoder passes with the KV cache as numpy arrays between passes
  (the CPU default; beam search re-gathers it by surviving beam, `reorder`).
- `DevicePasses`: the same passes with onnxruntime IO binding, the KV cache left on the
  session's device (on by default with CUDA): per pass only the tokens go up and the head
  scores (B, n, M) come back.

Both expose `step(tokens) -> head scores`, the `next_scores` that service/decoding.py's
greedy and beam loops are written over.

CUDA graphs are not used (the CUDA provider's enable_cuda_graph stays off). A captured
graph replays fixed shapes at fixed addresses, but the decoder's past KV grows by the
tokens of every pass (B, nh, P, hd) -> (B, nh, P + T, hd): one capture per (batch size,
candidate bucket, pass position, items per pass), each pinning its own buffers; and
deadline steps end rows early. It would need a decoder exported with a fixed-size KV
buffer (max_steps, written at `start`, masked by position), gpt-fast style.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from contract.bundle import Bundle, BundleError

if TYPE_CHECKING:
    from service.engine import Engine
    from service.engine_types import DeviceBatch, EncodedBatch

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

ORT_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    ort_state.Fail,
    ort_state.InvalidProtobuf,
    ort_state.InvalidGraph,
    ort_state.InvalidArgument,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)

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
RunFn = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]


class NoCudaError(ValueError):
    """device=cuda asked for by name, and onnxruntime cannot give it."""


def providers_for(device: str) -> list[Provider]:
    """The execution providers for `device` (auto | cpu | cuda), best first."""
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise NoCudaError(f"device=cuda but onnxruntime has no CUDA provider ({available})")
    if device != "cpu" and has_cuda:
        return [("CUDAExecutionProvider", dict(CUDA_OPTIONS)), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(intra_op: int, inter_op: int, optimization: str) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op
    opts.inter_op_num_threads = inter_op
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = OPT_LEVELS[optimization]
    opts.log_severity_level = 3  # warnings from ORT's graph passes are noise here
    return opts


def open_session(
    bundle: Bundle,
    graph: str,
    precision: str,
    opts: ort.SessionOptions,
    providers: list[Provider],
) -> ort.InferenceSession:
    """One graph of a verified bundle (from the bytes whose sha256 was checked), its input
    and output names checked against the manifest."""
    spec = bundle.graph(graph, precision)
    path = bundle.path / spec.file
    try:
        session = ort.InferenceSession(bundle.files[spec.file], sess_options=opts,
                                       providers=providers)  # fmt: skip
    except ORT_ERRORS as e:
        raise BundleError(f"{path}: corrupted ONNX, onnxruntime cannot load it: {e}") from e
    names = (
        tuple(i.name for i in session.get_inputs()),
        tuple(o.name for o in session.get_outputs()),
    )
    if names != (spec.inputs, spec.outputs):
        raise BundleError(f"{path}: graph inputs/outputs {names} differ from the manifest")
    return session


def fast_run(session: ort.InferenceSession) -> RunFn:
    """session.run without its per-call re-validation of the feed names: the names were
    checked against the manifest when the session was made. Falls back to the public
    run() if the binding is not where it has always been."""
    inner = getattr(session, "_sess", None)
    if inner is None or not callable(getattr(inner, "run", None)):
        return session.run

    def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = inner.run(names, feeds, None)
        return out

    return run


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


class HostPasses:
    """One batch's decoder passes on the host (gpt-fast's decode_one_token): the KV cache
    is numpy between passes. `past` is the first step's: the encoder's BOS-pass KV when it
    ran that pass, else (B, nh, 0, hd) empty."""

    def __init__(self, engine: Engine, enc: EncodedBatch, past: list[np.ndarray]) -> None:
        self._engine, self._enc, self.past = engine, enc, past

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B, T) int64 -> head scores at the last position (B, n, M)."""
        head, self.past = self._engine.decode_pass(self._enc, tokens, self.past)
        return head

    def reorder(self, src: np.ndarray) -> None:
        """Row b of the next pass continues row src[b] of this one (beam search)."""
        self.past = [kv[src] for kv in self.past]


class DevicePasses:
    """One batch's decoder passes with IO binding (gpt-fast's decode_one_token, on the
    device). The batch's z, bos, cand_mask and cross keys/values are bound once. A step
    binds the tokens (host -> device) and the start position (a device constant), runs,
    copies head_scores to the host, and binds the present KV (left on the device) as the
    next step's past. Per call, not shared.

    It drives onnxruntime's pybind objects directly (IOBinding._iobinding, OrtValue's
    C value, InferenceSession._sess), as fast_run does: the public wrappers re-check
    every call for WebGPU graph capture, make an OrtDevice per bind_output and wrap every
    output. Engine checks they exist (binding_internals) before it turns IO binding on."""

    def __init__(self, engine: Engine, enc: DeviceBatch) -> None:
        self._engine = engine
        decoder = engine.decoder
        self._run = decoder._sess.run_with_iobinding
        self._binding = binding = decoder.io_binding()._iobinding  # pybind object
        self._enc = enc  # a CPU OrtValue may be a view of a numpy array (cand_mask): keep it
        for name, value in enc.values.items():
            binding.bind_ortvalue_input(name, value._ortvalue)
        # the first step's past: the encoder's BOS pass KV when it ran that pass (the first
        # step is then the second pass), else (B, nh, 0, hd) empty, bound from the host
        past = enc.first_kv or engine.empty_device_past(enc.cand_mask.shape[0])
        for name, kv in zip(engine.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, kv._ortvalue)
        self.position = 1 if enc.first_kv else 0  # tokens fed so far (the next start)
        self._device = ort.OrtDevice.make(engine.device, CUDA_DEVICE_ID)._get_c_device()
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._present = engine.decoder_outputs[1:]
        self._tokens: np.ndarray | None = None  # the last step's tokens, kept alive

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B, T) int64 -> head scores at the last position (B, n, M) on the host;
        the present KV stays on the device as the next step's past."""
        engine, binding = self._engine, self._binding
        self._tokens = tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        binding.bind_ortvalue_input(
            "tokens", ort_state.OrtValue.ortvalue_from_numpy(tokens, self._device)
        )
        binding.bind_ortvalue_input("start", engine.device_starts[self.position]._ortvalue)
        binding.bind_output("head_scores", self._cpu)
        for name in self._present:  # fresh outputs: their length P + T grows every pass
            binding.bind_output(name, self._device)
        self._run(binding, None)
        outs = binding.get_outputs()
        for i, name in enumerate(engine.past_names, start=1):
            binding.bind_ortvalue_input(name, outs[i])  # the binding keeps its own reference
        self.position += tokens.shape[1]
        head: np.ndarray = outs[0].numpy()  # a view that owns a reference to its tensor
        return head

    def present(self) -> list[ort.OrtValue]:
        """The last step's present KV (the next step's past), where it lives."""
        outs = self._binding.get_outputs()
        return [ort.OrtValue(outs[i]) for i in range(1, len(outs))]
