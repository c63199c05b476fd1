"""Versions of a bundle in an artifacts directory, as a rollout makes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def copy_version(src: Path, artifacts: Path, name: str, **manifest: Any) -> Path:
    """A copy of the bundle `src` as `artifacts/name`; its manifest's version is `name`
    unless `manifest` says otherwise (any top-level manifest field may be given)."""
    dst = artifacts / name
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data.update({"version": name, **manifest})
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def point_latest(artifacts: Path, name: str) -> None:
    """artifacts/latest names `name`, replaced atomically as `python -m export build` does."""
    tmp = artifacts / "latest.tmp"
    tmp.write_text(f"{name}\n")
    tmp.replace(artifacts / "latest")
