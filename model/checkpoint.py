"""Checkpoints: safetensors weights + a JSON config beside them. Nothing is unpickled.

A checkpoint directory holds
- model.safetensors   the weights,
- config.json         {"kind", "model_config", "train_config", "meta"}: everything needed
                      to rebuild the model (the export and the service never use defaults),
- train_state.safetensors + train_state.json (optional): optimizer moments, step, epoch,
                      best validation score and RNG states, so an interrupted run resumes.
Files are written to a temporary name and renamed, so a crash never leaves half a file;
replace_dir publishes a whole directory (weights + train state) the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from contract.config import ModelConfig

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: the message names the file and the problem."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


def _model_classes() -> dict[str, type[nn.Module]]:
    from model.baselines import PRM, NAR4Rec, PointwiseDNN
    from model.network import GenReranker

    return {"gen_reranker": GenReranker, "dnn": PointwiseDNN, "prm": PRM, "nar4rec": NAR4Rec}


def kind_of(model: nn.Module) -> str:
    for kind, cls in _model_classes().items():
        if type(model) is cls:
            return kind
    raise TypeError(f"not a checkpointable model: {type(model).__name__}")


def build_model(kind: str, cfg: ModelConfig) -> nn.Module:
    classes = _model_classes()
    if kind not in classes:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(classes)}")
    return classes[kind](cfg)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    cfg: ModelConfig,
    train_config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = d / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "kind": kind_of(model)})
    tmp.replace(d / "model.safetensors")
    config = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "kind": kind_of(model),
        "model_config": cfg.to_dict(),
        "train_config": train_config or {},
        "meta": meta or {},
    }
    _atomic_write_bytes(d / "config.json", json.dumps(config, indent=2).encode())
    return d


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a gref checkpoint directory)")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a JSON {type(config).__name__}, want an object")
    version = config.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint_version {version!r}, expected {CHECKPOINT_VERSION}")
    for key in ("kind", "model_config"):
        if key not in config:
            raise CheckpointError(f"{path}: no {key!r}")
    return config


def load_checkpoint(directory: str | Path) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Rebuild the model from its own config and load its weights (strict)."""
    config = read_config(directory)
    path = Path(directory) / "config.json"
    try:
        cfg = ModelConfig.from_dict(config["model_config"])
        model = build_model(config["kind"], cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    weights_path = Path(directory) / "model.safetensors"
    weights = _read_tensors(weights_path)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        raise CheckpointError(f"{weights_path}: does not fit its config.json: {e}") from e
    model.eval()
    return model, cfg, config


def save_train_state(
    directory: str | Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Optimizer moments as tensors, scalars and RNG states as JSON."""
    d = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, pstate in optimizer.state_dict()["state"].items():
        for name, value in pstate.items():
            key = f"opt.{pid}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = d / "train_state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(d / "train_state.safetensors")
    payload = {"state": state, "opt_scalars": scalars}
    _atomic_write_bytes(d / "train_state.json", json.dumps(payload).encode())


def load_train_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    d = Path(directory)
    tensors = _read_tensors(d / "train_state.safetensors")
    path = d / "train_state.json"
    payload = _read_json(path)
    if not isinstance(payload, dict) or not {"state", "opt_scalars"} <= set(payload):
        raise CheckpointError(f"{path}: want an object with 'state' and 'opt_scalars'")
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{d / 'train_state.safetensors'}: no 'rng.torch'")
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in list(tensors.items()) + list(payload["opt_scalars"].items()):
            if not key.startswith("opt."):
                continue
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
        sd["state"] = state
        optimizer.load_state_dict(sd)
    except (AttributeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{d}: train state does not fit the optimizer: {e}") from e
    torch.set_rng_state(tensors["rng.torch"])
    result: dict[str, Any] = payload["state"]
    return result


def read_train_state(directory: str | Path) -> dict[str, Any]:
    """The JSON part of a train state (epoch, best, history, ...) without touching an
    optimizer or the RNG: what a resume checks before it loads anything."""
    path = Path(directory) / "train_state.json"
    payload = _read_json(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        raise CheckpointError(f"{path}: want an object with a 'state' object")
    result: dict[str, Any] = payload["state"]
    return result


def has_train_state(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / "train_state.safetensors").exists() and (d / "train_state.json").exists()


def arrays_digest(arrays: Iterable[tuple[str, np.ndarray]]) -> bytes:
    """sha256 over named arrays in the order given: each one's name, dtype, shape and
    bytes. The project's one content hash of tensors (bundle versions, run fingerprints)."""
    h = hashlib.sha256()
    for name, array in arrays:
        h.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.digest()


def tensors_digest(path: str | Path) -> bytes:
    """arrays_digest of a safetensors file's tensors, sorted by name: not its bytes, as the
    header's metadata order is not stable across processes (the same weights saved twice
    can differ there), and a hash of the weights must not move with it."""
    from safetensors.numpy import load_file as load_numpy

    try:
        tensors = load_numpy(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    return arrays_digest(sorted(tensors.items()))


def weights_digest(directory: str | Path) -> str:
    """tensors_digest (hex) of a checkpoint directory's weights."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return tensors_digest(path).hex()


def remove_dir(directory: str | Path) -> None:
    """Remove a directory tree if it exists (a file of that name too)."""
    d = Path(directory)
    if d.is_dir() and not d.is_symlink():
        shutil.rmtree(d)
    elif d.exists() or d.is_symlink():
        d.unlink()


def staging_dir(directory: str | Path) -> Path:
    """An empty sibling `<name>.tmp` to write a directory's new contents into before
    replace_dir publishes them."""
    d = Path(directory)
    tmp = d.with_name(d.name + ".tmp")
    remove_dir(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(staged: str | Path, directory: str | Path) -> Path:
    """Put the complete directory `staged` in the place of `directory` by renames: a
    reader finds the old contents or the new ones, never a mix (say epoch e's weights
    with epoch e-1's train state). A crash between the two renames leaves the old
    contents at `<name>.old`, which recover_dir puts back."""
    d = Path(directory)
    old = d.with_name(d.name + ".old")
    remove_dir(old)
    if d.exists():
        d.rename(old)
    Path(staged).rename(d)
    remove_dir(old)
    return d


def recover_dir(directory: str | Path) -> None:
    """Undo what a crash inside replace_dir or before it left behind: put `<name>.old`
    back when `<name>` is missing, drop a half-written `<name>.tmp`."""
    d = Path(directory)
    old = d.with_name(d.name + ".old")
    if old.exists() and not d.exists():
        old.rename(d)
    remove_dir(old)
    remove_dir(d.with_name(d.name + ".tmp"))
