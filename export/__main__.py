"""`python -m export {build,verify,publish}`: checkpoint -> ONNX bundle -> parity -> Redis."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _build(args: argparse.Namespace) -> int:
    from contract.bundle import LATEST
    from export.build import build_bundle, write_latest
    from export.config import ExportConfig

    ec = ExportConfig(
        opset=args.opset,
        fp16=args.fp16,
        label=args.label,
        items_path=args.items,
        simplify=not args.no_simplify,
        first_pass=not args.no_first_pass,
        fused_ops=not args.no_fused_ops,
        one_call=not args.no_one_call,
    )
    # --verify: `latest` names the new bundle only once its parity has passed
    path = build_bundle(args.checkpoint, args.out, ec, point_latest=not args.verify)
    print(f"bundle: {path}")
    if not args.verify:
        return 0
    code = _verify_path(str(path), None, None, {})
    latest = path.parent / LATEST
    if code:
        was = f"still names {latest.read_text().strip()}" if latest.is_file() else "none written"
        print(f"{latest} not moved ({was}); the failed bundle stays in {path}", file=sys.stderr)
        return code
    write_latest(path.parent, path.name)
    print(f"{latest} -> {path.name}")
    return 0


def _verify_path(
    bundle: str, checkpoint: str | None, precisions: list[str] | None, overrides: dict[str, int]
) -> int:
    from export.verify import verify_bundle

    reports = verify_bundle(bundle, checkpoint, precisions, overrides)
    for report in reports.values():
        print(report.summary())
    failed = [p for p, r in reports.items() if not r.passed]
    if failed:
        print(f"parity FAILED for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    overrides = {"requests": args.requests, "seed": args.seed}
    return _verify_path(args.bundle, args.checkpoint, args.precision, overrides)


def _publish(args: argparse.Namespace) -> int:
    from export.publish import publish_bundle

    report = publish_bundle(
        args.bundle,
        args.redis_url,
        prefix=args.prefix,
        dtype=args.dtype,
        chunk=args.chunk,
        cluster=args.cluster,
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="checkpoint -> artifacts/<version>/ (ONNX bundle)")
    b.add_argument("checkpoint", help="checkpoint directory (model.safetensors + config.json)")
    b.add_argument("--out", default="artifacts")
    b.add_argument("--items", default="", help="items.parquet: embed the item table")
    b.add_argument("--fp16", action="store_true", help="also write *.fp16.onnx (GPU path)")
    b.add_argument("--label", default="", help="human part of the version (default: date)")
    b.add_argument("--opset", type=int, default=20)
    b.add_argument("--no-simplify", action="store_true", help="keep the traced shape ops")
    b.add_argument(
        "--no-first-pass",
        action="store_true",
        help="the encoder stops at the cross keys/values (no folded BOS pass)",
    )
    b.add_argument(
        "--no-fused-ops",
        action="store_true",
        help="fp32 graphs with plain attention/LayerNorm ops (no com.microsoft kernels)",
    )
    b.add_argument(
        "--no-one-call",
        action="store_true",
        help="no greedy.onnx (the whole greedy decode in one call): multi-call decoding only",
    )
    b.add_argument("--verify", action="store_true", help="run `verify` right after")
    b.set_defaults(fn=_build)

    v = sub.add_parser("verify", help="parity of the bundle against its torch checkpoint")
    v.add_argument("bundle")
    v.add_argument("--checkpoint", help="default: the one recorded in the manifest")
    v.add_argument("--precision", action="append", choices=["fp32", "fp16"])
    v.add_argument("--requests", type=int, default=1000)
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(fn=_verify)

    u = sub.add_parser("publish", help="item embeddings -> Redis (versioned keys)")
    u.add_argument("bundle")
    u.add_argument("--redis-url", required=True)
    u.add_argument("--prefix", default="gref")
    u.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    u.add_argument("--chunk", type=int, default=10_000, help="keys per MSET")
    u.add_argument(
        "--cluster",
        action="store_true",
        help="--redis-url names a node of a Redis Cluster (one MSET per hash slot)",
    )
    u.set_defaults(fn=_publish)

    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
