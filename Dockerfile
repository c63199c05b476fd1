# syntax=docker/dockerfile:1
# gref-serve images. Today: `offline` (train, evaluate, `python -m model results`).
# The serving image (no torch, non-root, HEALTHCHECK on /healthz) comes with the operations
# issue; the service itself runs today with `make serve`.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS offline
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MPLBACKEND=Agg
WORKDIR /app
# torch first, CPU wheel index: an unpinned torch from PyPI pulls the CUDA packages
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY model ./model
COPY export ./export
COPY service ./service
COPY loadtest ./loadtest
RUN pip install '.[train,cpu]' \
    && useradd --create-home --uid 10001 gref \
    && mkdir -p /app/results /app/data && chown gref /app/results /app/data
USER gref
ENTRYPOINT ["python", "-m", "model"]
CMD ["results", "--quick", "--out", "results/quick"]
