# syntax=docker/dockerfile:1.7
#
# Images for the services in docker-compose.yml. Two targets, one project:
#
#   cpu  python:3.11-slim + torch's CPU wheel: migrations, flower, beat, cpu workers
#        (TTS, planning, mux). Also renders on CPU, slowly.
#        docker build --target cpu -t farm:cpu .
#   gpu  NVIDIA CUDA runtime + torch's CUDA wheel + TensorRT: render workers.
#        docker build --target gpu -t farm:gpu .
#
# Neither image holds model weights: they live in the /models volume (FARM_MODEL_DIR).

# torch must match the pin in pyproject.toml (==2.13.0 also accepts 2.13.0+cpu / +cu128),
# otherwise `pip install .` would replace the wheel installed here with PyPI's build.
ARG TORCH_VERSION=2.13.0
# The CUDA base and torch's CUDA index must agree on the CUDA major.minor.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128


# --- cpu ------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS cpu
ARG TORCH_VERSION

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FARM_HOME=/var/lib/farm \
    FARM_MODEL_DIR=/models

# mediapipe depends on opencv-contrib-python (not the headless build), which loads
# libGL and glib at import even though farm never opens a window.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU index: an unpinned resolve from PyPI pulls the multi-GB
# CUDA build into an image that has no GPU.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY farm ./farm
COPY workers ./workers
COPY models ./models
COPY migrations ./migrations
# psycopg: the compose file's FARM_DATABASE_URL is postgresql+psycopg, and the
# project's runtime dependencies do not include a Postgres driver.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . "psycopg[binary]>=3.1"

# Not root: Celery warns about it, and a compromised task should not own the box.
# The volume mount points exist in the image so that fresh named volumes inherit
# this ownership.
RUN useradd --system --uid 10001 --create-home --home-dir /home/farm farm \
    && mkdir -p /var/lib/farm /models \
    && chown farm:farm /var/lib/farm /models
USER farm
WORKDIR /var/lib/farm
# Services set their own command; this is what a bare `docker run farm:cpu` shows.
CMD ["farm", "--help"]


# --- gpu ------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FARM_HOME=/var/lib/farm \
    FARM_MODEL_DIR=/models \
    FARM_DEVICE=cuda
# utility mounts nvidia-smi, which `farm worker --gpus all` uses to count GPUs without
# initialising CUDA before the fork.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu 22.04 ships Python 3.10; uv installs a standalone CPython 3.11 into a venv.
COPY --from=ghcr.io/astral-sh/uv:0.8 /uv /usr/local/bin/uv
RUN uv venv --python 3.11 /opt/venv

# torch's CUDA wheel carries its own CUDA and cuDNN libraries; the base image brings
# the runtime pieces the driver hooks expect.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY farm ./farm
COPY workers ./workers
COPY models ./models
COPY migrations ./migrations
# The tensorrt extra lets render workers build engines for their own GPU at first use
# (engines are per GPU model and TensorRT version, kept under /models).
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install ".[tensorrt]" "psycopg[binary]>=3.1"

RUN useradd --system --uid 10001 --create-home --home-dir /home/farm farm \
    && mkdir -p /var/lib/farm /models \
    && chown farm:farm /var/lib/farm /models
USER farm
WORKDIR /var/lib/farm
CMD ["farm", "--help"]
