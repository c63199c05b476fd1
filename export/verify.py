"""`python -m export verify artifacts/<version>`: the ONNX engine against the torch reference.

On random requests (hashed ids and features, m in [2, 200], k in [1, min(m, 50)]),
batched by size:
- item tower, and head scores of the first pass and of a later pass: max |ONNX - torch|
  over real candidates, within `atol` (1e-4 for fp32);
- lists: Engine.rerank == model.decode.greedy_decode, request by request, with
  items_per_pass cycling over {1, 2, n}. A mismatch is a TIE (not a failure) when, at the
  first differing slot, torch's scores of the two picks are within `tie_eps`;
- every list is valid: min(k, m) distinct real candidates, never an index >= m;
- bundles with greedy.onnx: every request once more at n items per pass through the
  one-call decode (Engine.rerank one_call=True), its lists against torch's at n, counted
  apart (one_call_*). The lists above take the multi-call path (one_call=False).
The same `run_parity` backs the tests. fp16 is held to looser tolerances (see
ParityConfig.for_precision): half precision has ~3 significant digits, so near-ties flip.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.bundle import BundleError, load_bundle, read_manifest, sha256_file
from contract.features import HashedItems
from export.build import load_gen_reranker, write_manifest
from model.decode import greedy_decode
from model.network import GenReranker
from model.tensors import Inputs
from service.engine import Engine, EngineConfig, RerankRequest, RerankResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityConfig:
    requests: int = 1000
    min_m: int = 2
    max_m: int = 200  # capped at the model's max_candidates
    max_k: int = 50  # capped at the model's max_steps
    batch_size: int = 16  # requests of similar m batched together (sorted by m)
    seed: int = 0
    atol: float = 1e-4  # head scores and item tower, max abs diff
    tie_eps: float = 1e-5  # torch's scores of the two differing picks within this: a tie
    min_agreement: float = 0.999  # lists equal or tied, fraction of requests
    precision: str = "fp32"

    @classmethod
    def for_precision(cls, precision: str, **overrides: Any) -> ParityConfig:
        if precision == "fp16":
            # fp16 keeps 11 significant bits (~5e-4 relative); z, keys and values are
            # rounded at every layer, so O(1) scores move by a few 1e-3 (2.9e-3 seen)
            base = cls(precision="fp16", atol=2e-2, tie_eps=2e-2, min_agreement=0.99)
        else:
            base = cls(precision=precision)
        return replace(base, **overrides)


@dataclass
class ParityReport:
    precision: str
    requests: int
    batches: int
    max_m: int
    max_k: int
    items_per_pass: list[int]
    item_tower_max_abs: float = 0.0
    head_max_abs_pass1: float = 0.0
    head_max_abs_later: float = 0.0
    lists_equal: int = 0
    ties: int = 0
    failures: int = 0
    invalid: int = 0
    one_call_requests: int = 0  # 0: no greedy.onnx in this bundle (precision)
    one_call_equal: int = 0
    one_call_ties: int = 0
    one_call_failures: int = 0
    atol: float = 0.0
    tie_eps: float = 0.0
    min_agreement: float = 0.0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return (self.lists_equal + self.ties) / max(self.requests, 1)

    @property
    def one_call_agreement(self) -> float:
        agreed = self.one_call_equal + self.one_call_ties
        return agreed / self.one_call_requests if self.one_call_requests else 1.0

    @property
    def passed(self) -> bool:
        scores_ok = max(self.item_tower_max_abs, self.head_max_abs_pass1,
                        self.head_max_abs_later) <= self.atol  # fmt: skip
        agree = min(self.agreement, self.one_call_agreement) >= self.min_agreement
        return scores_ok and self.invalid == 0 and agree

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = d["problems"][:20]
        return d | {
            "agreement": self.agreement,
            "one_call_agreement": self.one_call_agreement,
            "passed": self.passed,
        }

    def summary(self) -> str:
        return "\n".join(
            [
                f"parity {self.precision}: {'PASSED' if self.passed else 'FAILED'} "
                f"({self.requests} requests in {self.batches} batches, m <= {self.max_m}, "
                f"k <= {self.max_k}, items_per_pass {self.items_per_pass}, "
                f"{self.seconds:.1f} s)",
                f"  item tower   max |onnx - torch| = {self.item_tower_max_abs:.2e}"
                f"  (atol {self.atol:g})",
                f"  head scores  pass 1 {self.head_max_abs_pass1:.2e}, later pass "
                f"{self.head_max_abs_later:.2e}",
                f"  lists        equal {self.lists_equal}, ties {self.ties} "
                f"(|Δ| <= {self.tie_eps:g}), failures {self.failures}, invalid {self.invalid}"
                f"  -> agreement {self.agreement:.4%} (need {self.min_agreement:.1%})",
                f"  one call     equal {self.one_call_equal}, ties {self.one_call_ties}, "
                f"failures {self.one_call_failures} of {self.one_call_requests} (n items "
                "per pass; 0: no greedy.onnx)",
                *(f"  ! {p}" for p in self.problems[:10]),
            ]
        )


@dataclass(frozen=True)
class _Group:
    inp: Inputs  # torch, padded to the group's max m
    requests: list[RerankRequest]
    k: np.ndarray  # (B,) requested k
    p: int


def _random_groups(model: GenReranker, pc: ParityConfig) -> list[_Group]:
    cfg, s = model.cfg, model.cfg.schema
    rng = np.random.default_rng(pc.seed)
    max_m = min(pc.max_m, cfg.max_candidates)
    ms = rng.integers(min(pc.min_m, max_m), max_m + 1, size=pc.requests)
    ks = np.array([rng.integers(1, min(m, pc.max_k, cfg.max_steps) + 1) for m in ms])
    sizes = np.argsort(ms, kind="stable")
    ps = sorted({1, min(2, cfg.omtp_heads), cfg.omtp_heads})
    groups = []
    for g, at in enumerate(range(0, pc.requests, pc.batch_size)):
        rows = sizes[at : at + pc.batch_size]
        B, M = len(rows), int(ms[rows].max())
        m = ms[rows]
        mask = np.arange(M)[None, :] < m[:, None]  # (B, M)
        item_id = np.where(mask, rng.integers(1, s.item_id_buckets, (B, M)), 0)
        cat = np.zeros((B, M, len(s.categorical_buckets)), np.int64)
        for f, buckets in enumerate(s.categorical_buckets):
            cat[..., f] = np.where(mask, rng.integers(1, buckets, (B, M)), 0)
        dense = rng.standard_normal((B, M, len(s.item_dense))).astype(np.float32)
        dense = np.where(mask[..., None], dense, 0).astype(np.float32)
        score = np.where(mask, rng.standard_normal((B, M)), 0).astype(np.float32)
        user_id = rng.integers(1, s.user_id_buckets, B)
        user_dense = rng.standard_normal((B, len(s.user_dense))).astype(np.float32)
        inp = Inputs(
            item_id=torch.from_numpy(item_id),
            item_cat=torch.from_numpy(cat),
            item_dense=torch.from_numpy(dense),
            upstream_score=torch.from_numpy(score),
            cand_mask=torch.from_numpy(mask),
            user_id=torch.from_numpy(user_id),
            user_dense=torch.from_numpy(user_dense),
        )
        requests = [
            RerankRequest(
                upstream_score=score[b, : m[b]],
                user_id=int(user_id[b]),
                user_dense=user_dense[b],
                k=int(ks[rows][b]),
                items=HashedItems(item_id[b, : m[b]], cat[b, : m[b]], dense[b, : m[b]]),
            )
            for b in range(B)
        ]
        groups.append(_Group(inp, requests, ks[rows], ps[g % len(ps)]))
    return groups


def _masked_max_abs(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(diff[np.broadcast_to(mask, diff.shape)].max(initial=0.0))


def _head_scores(model: GenReranker, engine: Engine, grp: _Group) -> tuple[float, ...]:
    """Max |ONNX - torch| of the item tower, pass 1 (BOS: the decoder's, and the encoder's
    folded one when the bundle has it) and pass 2 (the first p items of the torch list as
    tokens), over real candidates."""
    inp, M = grp.inp, grp.inp.m
    mask = inp.cand_mask.numpy()
    with torch.no_grad():
        static = model.embed_items(inp)
        enc = model.encode(static, inp)
        out1, past = model.decode(enc, torch.full((inp.batch_size, 1), -1))
        first = greedy_decode(model, inp, k=grp.p, items_per_pass=grp.p).order
        tokens = first.clamp(min=0)  # (B, p)
        out2, _ = model.decode(enc, tokens, past)
    batch = engine.prepare(grp.requests)
    tower = _masked_max_abs(batch.static[:, :M], static.numpy(), mask[..., None])
    e_enc = engine.encode(batch)
    B = inp.batch_size
    h1, e_past = engine.decode_pass(e_enc, np.full((B, 1), -1, np.int64), engine.empty_past(B))
    h2, _ = engine.decode_pass(e_enc, tokens.numpy(), e_past)
    m3 = mask[:, None, :]  # (B, 1, M)
    pass1 = _masked_max_abs(h1[..., :M], out1[:, -1].numpy(), m3)
    if e_enc.first is not None:  # the encoder's folded BOS pass: the same scores
        pass1 = max(pass1, _masked_max_abs(e_enc.first[0][..., :M], out1[:, -1].numpy(), m3))
    later = _masked_max_abs(h2[..., :M], out2[:, -1].numpy(), m3)
    return tower, pass1, later


def _torch_gap(model: GenReranker, inp: Inputs, b: int, ref: np.ndarray, got: np.ndarray,
               t: int, p: int) -> float:  # fmt: skip
    """Torch's score of its own pick minus its score of the engine's pick at slot t (the
    first difference), replaying request b's torch list through the KV cache."""
    one = Inputs(*(getattr(inp, f)[b : b + 1] for f in Inputs.__dataclass_fields__))
    with torch.no_grad():
        enc = model.encode(model.embed_items(one), one)
        tokens, past = torch.full((1, 1), -1), None
        for q in range(t // p + 1):
            out, past = model.decode(enc, tokens, past)
            tokens = torch.from_numpy(ref[q * p : (q + 1) * p])[None]
        head = out[0, -1, t % p]  # (M,)
    return float(head[int(ref[t])] - head[int(got[t])])


def _valid(order: np.ndarray, m: int, k: int) -> str | None:
    if order.shape != (min(k, m),):
        return f"length {order.shape}, want {min(k, m)}"
    if len(np.unique(order)) != len(order):
        return f"repeated item in {order.tolist()}"
    if (order < 0).any() or (order >= m).any():
        return f"item outside the {m} candidates in {order.tolist()}"
    return None


def run_parity(model: GenReranker, engine: Engine, pc: ParityConfig) -> ParityReport:
    """Compare the engine with the torch reference on random requests (module docstring)."""
    threads = torch.get_num_threads()
    # small tensors: more intra-op threads only wait on each other (10x slower on 2 cores)
    torch.set_num_threads(1)
    try:
        return _run_parity(model, engine, pc)
    finally:
        torch.set_num_threads(threads)


def _run_parity(model: GenReranker, engine: Engine, pc: ParityConfig) -> ParityReport:
    t0 = time.perf_counter()
    model.eval()
    groups = _random_groups(model, pc)
    report = ParityReport(
        precision=pc.precision,
        requests=pc.requests,
        batches=len(groups),
        max_m=max(int(g.inp.cand_mask.sum(1).max()) for g in groups),
        max_k=max(int(g.k.max()) for g in groups),
        items_per_pass=sorted({g.p for g in groups}),
        atol=pc.atol,
        tie_eps=pc.tie_eps,
        min_agreement=pc.min_agreement,
    )
    for gi, grp in enumerate(groups):
        tower, pass1, later = _head_scores(model, engine, grp)
        report.item_tower_max_abs = max(report.item_tower_max_abs, tower)
        report.head_max_abs_pass1 = max(report.head_max_abs_pass1, pass1)
        report.head_max_abs_later = max(report.head_max_abs_later, later)
        results = engine.rerank(grp.requests, items_per_pass=grp.p, one_call=False)
        counts = _compare(model, grp, results, grp.p, pc, report, f"batch {gi}")
        report.lists_equal += counts[0]
        report.ties += counts[1]
        report.failures += counts[2]
        if engine.one_call:
            n = model.cfg.omtp_heads
            results = engine.rerank(grp.requests, items_per_pass=n, one_call=True)
            counts = _compare(model, grp, results, n, pc, report, f"one call, batch {gi}")
            report.one_call_requests += len(results)
            report.one_call_equal += counts[0]
            report.one_call_ties += counts[1]
            report.one_call_failures += counts[2]
    report.seconds = time.perf_counter() - t0
    return report


def _compare(
    model: GenReranker,
    grp: _Group,
    results: list[RerankResult],
    p: int,
    pc: ParityConfig,
    report: ParityReport,
    where: str,
) -> tuple[int, int, int]:
    """The engine's lists against greedy_decode at p items per pass -> (equal, ties,
    failures); invalid lists counted in report.invalid, problems appended to it."""
    equal = ties = failures = 0
    ref = greedy_decode(model, grp.inp, k=int(grp.k.max()), items_per_pass=p).order
    for b, res in enumerate(results):
        m, k = grp.requests[b].m, int(grp.k[b])
        want = ref[b, : min(k, m)].numpy()
        problem = _valid(res.order, m, k)
        if problem:
            report.invalid += 1
            report.problems.append(f"{where} request {b}: {problem}")
        elif np.array_equal(res.order, want):
            equal += 1
        else:
            t = int(np.flatnonzero(res.order != want)[0])
            gap = _torch_gap(model, grp.inp, b, want, res.order, t, p)
            if abs(gap) <= pc.tie_eps:
                ties += 1
            else:
                failures += 1
                report.problems.append(
                    f"{where} request {b} (m={m}, k={k}, p={p}): slot {t}: "
                    f"onnx {res.order.tolist()} vs torch {want.tolist()}, gap {gap:.2e}"
                )
    return equal, ties, failures


def verify_bundle(
    bundle_dir: str | Path,
    checkpoint: str | Path | None = None,
    precisions: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    write: bool = True,
) -> dict[str, ParityReport]:
    """Parity of every precision in the bundle (or `precisions`) against the checkpoint it
    was exported from; writes the reports into manifest.json (parity) unless write=False.
    overrides: ParityConfig fields (requests, seed, ...) on top of the precision's defaults."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    source = manifest.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("weights_sha256"), str):
        raise BundleError(f"{root / 'manifest.json'}: source.weights_sha256 missing: cannot "
                          "tell which checkpoint this bundle was built from")  # fmt: skip
    if checkpoint is None and not isinstance(source.get("checkpoint"), str):
        raise BundleError(f"{root / 'manifest.json'}: no source.checkpoint: pass --checkpoint")
    ckpt = Path(checkpoint or source["checkpoint"])
    model, _, _ = load_gen_reranker(ckpt)
    weights_sha = sha256_file(ckpt / "model.safetensors")
    if weights_sha != source["weights_sha256"]:
        raise BundleError(f"{ckpt}: weights differ from the ones bundle {root} was built from")
    reports = {}
    for precision in precisions or list(manifest["graphs"]):
        cfg = ParityConfig.for_precision(precision, **(overrides or {}))
        # check_parity=False: a bundle whose recorded parity failed can be measured again
        bundle = load_bundle(root, item_table=False, check_parity=False)
        engine = Engine(bundle, EngineConfig(device="cpu", precision=precision))
        reports[precision] = run_parity(model, engine, cfg)
        log.info("%s", reports[precision].summary())
    if write:
        manifest = read_manifest(root)
        for name, entry in manifest["files"].items():  # re-hash: nothing changed under us
            if sha256_file(root / name) != entry["sha256"]:
                raise BundleError(f"{root / name}: sha256 changed during verify")
        parity = dict(manifest.get("parity") or {})
        parity |= {p: r.to_dict() for p, r in reports.items()}
        manifest["parity"] = parity
        write_manifest(root, manifest)
        log.info("parity written to %s", root / "manifest.json")
    return reports


def report_json(reports: dict[str, ParityReport]) -> str:
    return json.dumps({p: r.to_dict() for p, r in reports.items()}, indent=2)
