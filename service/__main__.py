"""`python -m service [--host H] [--port P] [--admin-port A] [--workers N] [--bundle DIR]`:
uvicorn with the settings (RERANK_* environment; the flags override it). Logs are JSON
lines on stderr. /healthz, /readyz and /metrics are also on the admin port (9000; 0 = off),
answered off the event loop (service/admin.py). SIGTERM drains first: /readyz fails for
RERANK_DRAIN_S seconds while requests are still served, then uvicorn shuts down gracefully
(service/lifecycle.py). Idle keep-alive connections close after RERANK_KEEP_ALIVE_S.
Requests shed by admission are answered by the HTTP protocol itself (service/admission.py).

With --workers > 1 every worker builds its own app from the environment, and metrics go
through Prometheus' multiprocess mode: PROMETHEUS_MULTIPROC_DIR (a fresh temporary
directory when unset) must be set before prometheus_client is imported, so the app is
imported only after it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from pydantic import ValidationError

from service.logs import log_config
from service.settings import Settings

# uvicorn's httptools protocol with the admission door in its headers step (service/
# admission.py); named, not imported: each worker imports it after the environment is set
HTTP_PROTOCOL = "service.admission:DoorProtocol"


def _flags_to_env(argv: Sequence[str] | None) -> None:
    """The command line's flags into RERANK_* variables: every worker reads the
    environment, so the flags go there (over what it held)."""
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", help="bind address (RERANK_HOST)")
    parser.add_argument("--port", type=int, help="port (RERANK_PORT)")
    parser.add_argument(
        "--admin-port", type=int, help="admin port: probes and metrics, 0 = off (RERANK_ADMIN_PORT)"
    )
    parser.add_argument("--workers", type=int, help="worker processes (RERANK_WORKERS)")
    parser.add_argument("--bundle", help="bundle or artifacts directory (RERANK_BUNDLE)")
    args = parser.parse_args(argv)
    for name in ("host", "port", "admin_port", "workers", "bundle"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"RERANK_{name.upper()}"] = str(value)


def main(argv: Sequence[str] | None = None) -> int:
    _flags_to_env(argv)
    try:
        settings = Settings()
    except ValidationError as e:
        logging.basicConfig(level=logging.ERROR)
        logging.getLogger("service").error("bad settings:\n%s", e)
        return 2
    own_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="gref-metrics-")  # fresh: no stale worker files
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir

    import uvicorn  # after the environment is final: workers and prometheus_client read it

    try:
        uvicorn.run(
            "service.app:factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=log_config(settings.log_level),
            access_log=False,
            timeout_keep_alive=settings.keep_alive_s,
            http=HTTP_PROTOCOL,
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
