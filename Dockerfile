# syntax=docker/dockerfile:1.7
# gref-serve images (BuildKit). Targets, see docs/operations.md:
#   serve      (default, last stage) CPU serving: python -m service, onnxruntime (the `cpu` extra)
#   serve-gpu  GPU serving on a CUDA + cuDNN runtime base: onnxruntime-gpu (the `gpu` extra)
#   train      offline: torch CPU, train / evaluate / `python -m model results`
# The serving images hold the project wheel and its core dependencies plus exactly one
# onnxruntime: no torch, no compiler, no source tree; they run as uid 10001.
#
#   docker build -t gref-serve:cpu .
#   docker build -t gref-serve:gpu --target serve-gpu .
#   docker build -t gref-serve:cpu-baked --build-arg BAKE_BUNDLE=yes .   # copies artifacts/
ARG PYTHON_VERSION=3.11
# onnxruntime-gpu on PyPI is built for CUDA 12 + cuDNN 9: keep the base on those majors
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
# yes: bake ./artifacts (an artifacts dir whose `latest` names a bundle) into the image
ARG BAKE_BUNDLE=no

# ---- builder: the project wheel (pure Python); pip's build backend stays here -------------
FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY model ./model
COPY export ./export
COPY service ./service
COPY loadtest ./loadtest
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- the bundle baked in, or an empty directory (then mount one: RERANK_BUNDLE) ----------
FROM python:${PYTHON_VERSION}-slim AS bundle-no
RUN mkdir -p /artifacts

FROM bundle-no AS bundle-yes
COPY artifacts/ /artifacts/

# a stage of this file, picked by BAKE_BUNDLE (not an image to tag)
# hadolint ignore=DL3006
FROM bundle-${BAKE_BUNDLE} AS bundle

# ---- train: the offline image (torch CPU; results, training, export) ---------------------
FROM python:${PYTHON_VERSION}-slim AS train
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MPLBACKEND=Agg
WORKDIR /app
# torch first, CPU wheel index: an unpinned torch from PyPI pulls the CUDA packages
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY model ./model
COPY export ./export
COPY service ./service
COPY loadtest ./loadtest
# hadolint ignore=DL3013
RUN pip install '.[train,cpu]' \
    && useradd --create-home --uid 10001 gref \
    && mkdir -p /app/results /app/data && chown 10001 /app/results /app/data
USER 10001
ENTRYPOINT ["python", "-m", "model"]
CMD ["results", "--quick", "--out", "results/quick"]

# ---- serve-gpu: CUDA runtime + cuDNN base, onnxruntime-gpu ------------------------------
FROM ${CUDA_IMAGE} AS serve-gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# the distribution's python3 (3.12 on ubuntu24.04, 3.10 on 22.04), in a venv: apt versions
# follow the pinned base image
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 gref
# the wheel: bind-mounted from the builder (never a layer) and installed by its path, so no
# same-named project on the index can stand in (DL3013: its dependencies are bounded in
# pyproject.toml, from the index)
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=deploy/docker/check_image.py,target=/tmp/check_image.py \
    for wheel in /wheels/gref_serve-*.whl; do pip install "${wheel}[gpu]"; done \
    && python /tmp/check_image.py gpu
COPY --from=bundle --chown=10001:10001 /artifacts /app/artifacts
WORKDIR /app
ENV RERANK_BUNDLE=/app/artifacts RERANK_HOST=0.0.0.0 RERANK_PORT=8000 RERANK_ADMIN_PORT=9000 \
    RERANK_DEVICE=cuda
USER 10001
# 8000: the API; 9000: the admin listener (/healthz, /readyz, /metrics off the event loop)
EXPOSE 8000 9000
# liveness on the admin port (answered under overload); the main port when it is off (0)
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; e = os.environ.get; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (int(e('RERANK_ADMIN_PORT', '9000')) or e('RERANK_PORT', '8000')), timeout=2)"]
CMD ["python", "-m", "service"]

# ---- serve: the default target, CPU ------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# the wheel: bind-mounted from the builder (never a layer) and installed by its path, so no
# same-named project on the index can stand in (DL3013: its dependencies are bounded in
# pyproject.toml, from the index)
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=deploy/docker/check_image.py,target=/tmp/check_image.py \
    for wheel in /wheels/gref_serve-*.whl; do pip install "${wheel}[cpu]"; done \
    && python /tmp/check_image.py cpu \
    && useradd --create-home --uid 10001 gref
COPY --from=bundle --chown=10001:10001 /artifacts /app/artifacts
WORKDIR /app
ENV RERANK_BUNDLE=/app/artifacts RERANK_HOST=0.0.0.0 RERANK_PORT=8000 RERANK_ADMIN_PORT=9000 \
    RERANK_DEVICE=cpu
USER 10001
# 8000: the API; 9000: the admin listener (/healthz, /readyz, /metrics off the event loop)
EXPOSE 8000 9000
# liveness on the admin port (answered under overload); the main port when it is off (0)
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; e = os.environ.get; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (int(e('RERANK_ADMIN_PORT', '9000')) or e('RERANK_PORT', '8000')), timeout=2)"]
CMD ["python", "-m", "service"]
