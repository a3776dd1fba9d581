# loraserve on a CUDA machine. Build:  docker build -t loraserve .
# Run the demo:     docker run --gpus all -p 8000:8000 -v loraserve-cache:/cache loraserve
# Run a real base:  docker run --gpus all -p 8000:8000 -v loraserve-cache:/cache \
#                     -v /srv/models/qwen:/models/base:ro -v /srv/adapters:/adapters:ro \
#                     loraserve --model /models/base --adapter-dir /adapters
# No weights are baked in: the base and adapters come from the volumes, the demo bundle and the hub cache
# are built or downloaded into /cache on first start.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------- build stage
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The distribution's python3 (3.12 on Ubuntu 24.04); its exact patch version is the base image's business.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The same steps scripts/check_install.sh runs outside Docker: copy these paths, then `pip install .`.
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapter_store ./adapter_store
RUN pip install --no-cache-dir .

# -------------------------------------------------------------------------------------- runtime stage
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 loraserve \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin loraserve \
    && mkdir -p /models /adapters /cache \
    && chown loraserve:loraserve /models /adapters /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    LORASERVE_PORT=8000
VOLUME ["/models", "/adapters", "/cache"]
USER 10001:10001
WORKDIR /home/loraserve
EXPOSE 8000
# Liveness: /health answers 200 while the engine loop runs. The first start may build the demo bundle or
# load a large base, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORASERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["loraserve", "serve", "--host", "0.0.0.0"]
CMD []
