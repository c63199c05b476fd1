"""The model bundle (design §5): its names, its manifest, and its safe loader.

A bundle is a directory `artifacts/<version>/` written by `python -m export build`:

    manifest.json           schema_version, version, model config, graphs, files + sha256, ...
    item_tower.onnx         item_id (N,), item_cat (N, Fc), item_dense (N, Fd) -> static (N, d)
    encoder.onnx            static, upstream_score, cand_mask, user_id, user_dense
                            -> z, bos, cross.{i}.key / cross.{i}.value, and (bundles
                            exported with first_pass, the default) the decoder's BOS pass:
                            first_scores (B, n, M), first.{i}.key / first.{i}.value
    decoder.onnx            one decode pass -> head_scores (B, n, M) at the last position,
                            present.{i}.key / present.{i}.value
    greedy.onnx             optional (fp32): the whole greedy decode in one call, the
                            encoder's inputs + passes () -> order, scores (B, (passes + 1) n)
    *.fp16.onnx             the same graphs in float16 (GPU path), when exported with --fp16
    item_embeddings.npy     (N, d) float32, item_ids.npy (N,) int64 id keys (contract.ids):
                            the item table, if given

`load_bundle` reads every file listed in the manifest, checks its size and sha256 BEFORE
anything is parsed or any session created, and keeps the verified bytes: sessions are
created from those bytes, so a file swapped on disk after the check is never loaded.
Nothing is unpickled (np.load(..., allow_pickle=False)). Every problem is a BundleError
whose message names the file (or the manifest field) and the problem: a malformed
manifest, an unknown id hash, a parity that `verify` recorded as FAILED, an item table
with a NaN row or a repeated id are refused. numpy only: no torch, no onnx.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contract.config import ModelConfig
from contract.features import HASH_NAME
from contract.ids import ID_KEY_NAME

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # bump when the manifest or a graph's inputs/outputs change meaning
MANIFEST = "manifest.json"
LATEST = "latest"  # artifacts/latest: a text file holding the newest version
GRAPHS = ("item_tower", "encoder", "decoder")
# graphs a bundle may have: greedy.onnx, the whole greedy decode in one call (fp32; older
# bundles have none and decode with the encoder and decoder graphs)
OPTIONAL_GRAPHS = ("greedy",)
PRECISIONS = ("fp32", "fp16")
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_IDS = "item_ids.npy"
# file types the service would load: any such file in the bundle must be in the manifest
LOADABLE_SUFFIXES = (".onnx", ".npy", ".data", ".ort")
KNOWN_HASHES = (HASH_NAME,)  # id hashes contract.features implements: any other is refused
ITEM_DTYPES = ("float32", "float16")  # item_table.dtype: the .npy's dtype


class BundleError(Exception):
    """A bundle that must not be served: missing or tampered file, bad manifest, ..."""


def graph_file(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def cross_names(layers: int) -> list[str]:
    return [f"cross.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def first_names(layers: int) -> list[str]:
    """The BOS pass's present KV, as a folded encoder outputs it (the next pass's past)."""
    return [f"first.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


FIRST_SCORES = "first_scores"  # the BOS pass's head scores (B, n, M), from the encoder

# graph input/output names, fixed: the exporter writes them, the engine feeds and reads them
ITEM_TOWER_INPUTS = ["item_id", "item_cat", "item_dense"]
ITEM_TOWER_OUTPUTS = ["static"]
ENCODER_INPUTS = ["static", "upstream_score", "cand_mask", "user_id", "user_dense"]
DECODER_FIXED_INPUTS = ["tokens", "start", "z", "bos", "cand_mask"]
# greedy.onnx: the encoder's inputs and the decoder passes after the BOS pass, () int64
GREEDY_INPUTS = [*ENCODER_INPUTS, "passes"]
GREEDY_OUTPUTS = ["order", "scores"]  # (B, (passes + 1) * n) int64 / float32


def encoder_outputs(layers: int, first_pass: bool = True) -> list[str]:
    first = [FIRST_SCORES, *first_names(layers)] if first_pass else []
    return ["z", "bos", *cross_names(layers), *first]


def decoder_inputs(layers: int) -> list[str]:
    return [*DECODER_FIXED_INPUTS, *cross_names(layers), *past_names(layers)]


def decoder_outputs(layers: int) -> list[str]:
    return ["head_scores", *present_names(layers)]


def io_names(graph: str, layers: int, first_pass: bool = True) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of one graph of a model with `layers` decoder layers; first_pass:
    the encoder also runs the decoder's BOS pass (FIRST_SCORES, first.{i}.*)."""
    if graph == "item_tower":
        return ITEM_TOWER_INPUTS, ITEM_TOWER_OUTPUTS
    if graph == "encoder":
        return ENCODER_INPUTS, encoder_outputs(layers, first_pass)
    return decoder_inputs(layers), decoder_outputs(layers)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle: its file and its input/output names."""

    name: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in memory. `files` holds the checked bytes of every listed file."""

    path: Path
    manifest: dict[str, Any]
    model_config: ModelConfig
    graphs: dict[str, dict[str, GraphSpec]]  # precision -> graph name -> spec
    files: dict[str, bytes] = field(repr=False)  # verified bytes of every graph file
    item_ids: np.ndarray | None = field(default=None, repr=False)  # (N,) int64 id keys
    # (N, d) float32 or float16 (item_table.dtype), every value finite
    item_embeddings: np.ndarray | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p in self.graphs)

    def graph(self, name: str, precision: str = "fp32") -> GraphSpec:
        if precision not in self.graphs:
            raise BundleError(f"{self.path}: no {precision} graphs in this bundle")
        return self.graphs[precision][name]

    def has_graph(self, name: str, precision: str = "fp32") -> bool:
        return name in self.graphs.get(precision, {})

    def graph_bytes(self, name: str, precision: str = "fp32") -> bytes:
        return self.files[self.graph(name, precision).file]


def _fail(path: Path, problem: str) -> BundleError:
    return BundleError(f"{path}: {problem}")


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """manifest.json, with its schema_version checked (a future one is refused)."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise _fail(path, "missing (not a model bundle directory)")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise _fail(path, f"unreadable manifest: {e}") from e
    if not isinstance(manifest, dict):
        raise _fail(path, "manifest is not a JSON object")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, f"schema_version {version!r} is not an integer")
    if version > SCHEMA_VERSION:
        raise _fail(
            path,
            f"schema_version {version} is from a newer exporter; this service reads "
            f"up to {SCHEMA_VERSION} (upgrade the service)",
        )
    if version < 1:
        raise _fail(path, f"schema_version {version} is not supported")
    for key in ("version", "model_config", "graphs", "files"):
        if key not in manifest:
            raise _fail(path, f"manifest has no {key!r}")
    check_manifest(path, manifest)
    return manifest


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _object(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"{where}: {_show(value)}, want a JSON object")
    return value


def _name(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"{where}: {_show(value)}, want a non-empty string")
    return value


def _whole(path: Path, where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _fail(path, f"{where}: {_show(value)}, want an integer >= 0")
    return value


def check_manifest(path: Path, manifest: dict[str, Any]) -> ModelConfig:
    """Every manifest field the service, the engine, `verify` or `publish` reads has the
    type and meaning they expect; BundleError naming the field otherwise (never a KeyError
    deep in a loader). path: the manifest file, for the message. -> its model config."""
    _name(path, "version", manifest["version"])
    try:
        cfg = ModelConfig.from_dict(_object(path, "model_config", manifest["model_config"]),
                                    complete=True)  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(path, f"model_config: {e}") from e
    _check_hashing(path, manifest, cfg)
    _graph_specs(path, manifest)
    for name, entry in _object(path, "files", manifest["files"]).items():
        entry = _object(path, f"files.{name}", entry)
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise _fail(path, f"files.{name}.sha256: {_show(sha)}, want 64 hex digits")
        if entry.get("size") is not None:
            _whole(path, f"files.{name}.size", entry["size"])
    _check_item_table_entry(path, manifest, cfg)
    for precision, report in _object(path, "parity", manifest.get("parity") or {}).items():
        passed = _object(path, f"parity.{precision}", report).get("passed")
        if not isinstance(passed, bool):
            raise _fail(path, f"parity.{precision}.passed: {_show(passed)}, want true or false")
    return cfg


def _check_hashing(path: Path, manifest: dict[str, Any], cfg: ModelConfig) -> None:
    """The id hash the model was trained with is this service's, and the manifest's
    `hashing` (when present) agrees with it."""
    schema = cfg.schema
    if schema.hash_name not in KNOWN_HASHES:
        raise _fail(path, f"model_config.schema.hash_name {schema.hash_name!r}: unknown id hash "
                          f"(this service hashes ids with {', '.join(KNOWN_HASHES)}; serving it "
                          "would hash every id wrongly)")  # fmt: skip
    if manifest.get("hashing") is not None:
        hashing = _object(path, "hashing", manifest["hashing"])
        if hashing.get("name") != schema.hash_name or hashing.get("salt") != schema.hash_salt:
            raise _fail(path, f"hashing {_show(hashing)} disagrees with model_config.schema "
                              f"({schema.hash_name!r}, salt {schema.hash_salt})")  # fmt: skip
        # the id -> key rule (contract.ids) its item table and caches were keyed by; a
        # bundle from before string ids names none (its integer ids are their own keys)
        if hashing.get("id_keys", ID_KEY_NAME) != ID_KEY_NAME:
            raise _fail(path, f"hashing.id_keys {_show(hashing['id_keys'])}: unknown id key "
                              f"rule (this service keys ids by {ID_KEY_NAME!r})")  # fmt: skip


def _check_item_table_entry(path: Path, manifest: dict[str, Any], cfg: ModelConfig) -> None:
    """The `item_table` entry (when the bundle ships one) names its files, a known dtype and
    the model's width."""
    table = _object(path, "item_table", manifest.get("item_table") or {})
    if table.get("embeddings"):
        _name(path, "item_table.embeddings", table["embeddings"])
        _name(path, "item_table.ids", table.get("ids"))
        if table.get("dtype") not in ITEM_DTYPES:
            raise _fail(path, f"item_table.dtype: {_show(table.get('dtype'))}, want one of "
                              f"{', '.join(ITEM_DTYPES)}")  # fmt: skip
        if table.get("count") is not None:
            _whole(path, "item_table.count", table["count"])
        if table.get("dim", cfg.d_model) != cfg.d_model:
            raise _fail(path, f"item_table.dim {_show(table['dim'])} != model_config.d_model "
                              f"{cfg.d_model}")  # fmt: skip


def _graph_specs(path: Path, manifest: dict[str, Any]) -> dict[str, dict[str, GraphSpec]]:
    specs: dict[str, dict[str, GraphSpec]] = {}
    for precision, graphs in _object(path, "graphs", manifest["graphs"]).items():
        if precision not in PRECISIONS:
            raise _fail(path, f"unknown precision {precision!r} in graphs")
        graphs = _object(path, f"graphs.{precision}", graphs)
        specs[precision] = {}
        for name in GRAPHS:
            if name not in graphs:
                raise _fail(path, f"graphs.{precision} has no {name!r}")
            where = f"graphs.{precision}.{name}"
            specs[precision][name] = _graph_spec(path, where, name, graphs[name])
        for name in OPTIONAL_GRAPHS:
            if name in graphs:
                where = f"graphs.{precision}.{name}"
                specs[precision][name] = _graph_spec(path, where, name, graphs[name])
    if "fp32" not in specs:
        raise _fail(path, "no fp32 graphs")
    return specs


def _graph_spec(path: Path, where: str, name: str, value: Any) -> GraphSpec:
    g = _object(path, where, value)
    return GraphSpec(
        name=name,
        file=_name(path, f"{where}.file", g.get("file")),
        inputs=_io_names(path, f"{where}.inputs", g.get("inputs")),
        outputs=_io_names(path, f"{where}.outputs", g.get("outputs")),
    )


def _io_names(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(path, f"{where}: {_show(value)}, want a list of {{name, ...}}")
    return tuple(
        _name(path, f"{where}[{i}].name", _object(path, f"{where}[{i}]", io).get("name"))
        for i, io in enumerate(value)
    )


def _read_verified(root: Path, name: str, entry: dict[str, Any], keep: bool = True) -> bytes:
    """The file's bytes (b"" unless keep), after checking it is a plain file inside the
    bundle with the manifest's size and sha256."""
    path = root / name
    if Path(name).name != name or name in (".", ".."):
        raise _fail(path, "file name with a directory part (refused)")
    if path.is_symlink():
        raise _fail(path, "is a symlink (refused)")
    if not path.is_file():
        raise _fail(path, "missing")
    size = entry.get("size")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise _fail(path, f"size mismatch: {actual_size} bytes, manifest says {size}")
    data = path.read_bytes() if keep else b""
    actual = sha256_bytes(data) if keep else sha256_file(path)
    if actual != entry.get("sha256"):
        raise _fail(path, f"sha256 mismatch: file {actual}, manifest {entry.get('sha256')}")
    return data


def _load_npy(root: Path, name: str, data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _fail(root / name, f"corrupted .npy: {e}") from e


def load_bundle(
    bundle_dir: str | Path, item_table: bool = True, check_parity: bool = True
) -> Bundle:
    """Read and verify a bundle. Order: manifest (schema_version, every field: see
    check_manifest), its parity, unknown files, every listed file's presence, size and
    sha256; only then the item table is parsed and checked. No ONNX session is created
    here (the Engine does, from the verified bytes).
    item_table=False: the .npy files are still verified (streamed) but not loaded, for a
    server that only needs the graphs.
    check_parity=False: for `python -m export verify` alone, which (re)measures it."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    model_config = ModelConfig.from_dict(manifest["model_config"])  # checked by read_manifest
    listed: dict[str, dict[str, Any]] = manifest["files"]
    specs = _graph_specs(root / MANIFEST, manifest)
    if check_parity:
        _check_parity(root / MANIFEST, manifest, specs)
    wanted = {spec.file for graphs in specs.values() for spec in graphs.values()}
    table = manifest.get("item_table") or {}
    if table.get("embeddings"):
        wanted |= {str(table["embeddings"]), str(table["ids"])}
    for name in sorted(wanted - set(listed)):
        raise _fail(root / name, "not listed in the manifest's files (refused)")
    for p in sorted(root.iterdir()):
        if p.suffix in LOADABLE_SUFFIXES and p.name not in listed:
            raise _fail(p, "unknown file: not listed in the manifest (refused)")
    arrays = {str(table["embeddings"]), str(table["ids"])} if table.get("embeddings") else set()
    files = {
        name: _read_verified(root, name, entry, keep=item_table or name not in arrays)
        for name, entry in listed.items()
    }
    item_ids = item_embeddings = None
    if arrays and item_table:
        item_embeddings = _load_npy(root, table["embeddings"], files.pop(table["embeddings"]))
        item_ids = _load_npy(root, table["ids"], files.pop(table["ids"]))
        _check_item_table(root, table, model_config.d_model, item_ids, item_embeddings)
    files = {name: data for name, data in files.items() if name not in arrays}
    log.info("bundle %s verified: %d files", manifest["version"], len(listed))
    return Bundle(
        path=root,
        manifest=manifest,
        model_config=model_config,
        graphs=specs,
        files=files,
        item_ids=item_ids,
        item_embeddings=item_embeddings,
    )


def _check_parity(
    path: Path, manifest: dict[str, Any], specs: dict[str, dict[str, GraphSpec]]
) -> None:
    """A precision whose recorded parity FAILED is refused; one never verified is served
    with a warning (a bundle built without --verify, or by hand)."""
    parity: dict[str, Any] = manifest.get("parity") or {}
    failed = sorted(p for p, report in parity.items() if not report["passed"])
    if failed:
        raise _fail(path, f"parity FAILED for {', '.join(failed)} (recorded by `python -m "
                          "export verify`): this bundle's ONNX graphs do not match its "
                          "checkpoint (refused)")  # fmt: skip
    unverified = [p for p in PRECISIONS if p in specs and p not in parity]
    if unverified:
        log.warning("bundle %s: parity never verified for %s (run `python -m export verify`)",
                    manifest["version"], ", ".join(unverified))  # fmt: skip


def _check_item_table(
    root: Path, table: dict[str, Any], d: int, ids: np.ndarray, embeddings: np.ndarray
) -> None:
    """The arrays `publish` writes to Redis, where every replica reads them: one bad row
    would reach every request holding that item."""
    emb_path, ids_path = root / table["embeddings"], root / table["ids"]
    dtype = table["dtype"]
    if embeddings.dtype != np.dtype(dtype):
        raise _fail(emb_path, f"dtype {embeddings.dtype}, manifest item_table.dtype says {dtype}")
    if embeddings.ndim != 2 or embeddings.shape[1] != d:
        raise _fail(emb_path, f"shape {embeddings.shape}, want (N, {d})")
    n = embeddings.shape[0]
    if table.get("count") is not None and table["count"] != n:
        raise _fail(emb_path, f"{n} rows, manifest item_table.count says {table['count']}")
    if ids.shape != (n,) or ids.dtype != np.int64:
        raise _fail(ids_path, f"{ids.dtype} {ids.shape}, want int64 (N,)")
    bad = ~np.isfinite(embeddings).all(axis=1)  # (N,)
    if bad.any():
        raise _fail(emb_path, f"{int(bad.sum())} of {n} rows not finite (NaN or inf), "
                              f"e.g. item ids {ids[bad][:5].tolist()}")  # fmt: skip
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise _fail(ids_path, f"{int((counts > 1).sum())} item ids more than once, "
                              f"e.g. {unique[counts > 1][:5].tolist()}")  # fmt: skip


def latest_version(artifacts_dir: str | Path) -> str:
    """The version named by artifacts/latest."""
    path = Path(artifacts_dir) / LATEST
    try:
        return path.read_text().strip()
    except OSError as e:
        raise _fail(path, f"cannot read: {e}") from e
