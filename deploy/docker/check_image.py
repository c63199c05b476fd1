"""`python check_image.py cpu|gpu`: refuse a serving image that carries what it must not.

Run at the end of the serving stages' install step (docker build fails on a non-zero exit):
no torch, exactly the onnxruntime distribution of the image's kind (never both: they share
the `onnxruntime` module and the one installed last silently wins), and the service and
the `publish` job importable from the installed wheel alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version

ORT = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}


def installed(dist: str) -> bool:
    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def problems(kind: str) -> list[str]:
    found = []
    if importlib.util.find_spec("torch") is not None:
        found.append("torch is installed (the serving image must not carry it)")
    for other_kind, dist in ORT.items():
        if other_kind == kind and not installed(dist):
            found.append(f"{dist} is not installed")
        if other_kind != kind and installed(dist):
            found.append(f"{dist} is installed in a {kind} image")
    if not found:
        for module in ("service.app", "export.publish"):
            importlib.import_module(module)
        if "torch" in sys.modules:
            found.append("importing the service imported torch")
        if "model" in sys.modules:  # service/ and publish read the contract package only
            found.append("importing the service imported the offline package model")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ORT:
        sys.stderr.write("usage: check_image.py cpu|gpu\n")
        return 2
    found = problems(argv[0])
    for problem in found:
        sys.stderr.write(f"check_image: {problem}\n")
    if not found:
        sys.stdout.write(f"check_image: {argv[0]} serving image ok\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
