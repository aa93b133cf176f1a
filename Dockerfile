# syntax=docker/dockerfile:1
#
# EdgeRLHF pipeline image: the environment only. The repository is bind-mounted
# at /workspace at run time (see docs/container.md), so code edits need no rebuild.
#
# Build (from the repo root):
#   docker build -t edgerlhf:latest .
# Build args (defaults below):
#   BASE_IMAGE      CUDA base image. Torch wheels bring their own CUDA user-space
#                   libraries; the base supplies the NVIDIA container-runtime
#                   settings and its driver requirement (CUDA 12.8 needs >= 570).
#   TORCH_VERSION   must equal the torch pin in requirements.in and the Makefile.
#   TORCH_VARIANT   wheel flavour on download.pytorch.org: cu126, cu128, cu130,
#                   cu132 or cpu. Keep BASE_IMAGE's CUDA version in step.
#   TORCH_INDEX_URL where torch comes from (defaults to the variant's index).
#   PYTHON_VERSION  CPython the lock was compiled and tested with.
#   UV_VERSION      uv release, used only to fetch the pinned CPython build.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG UV_VERSION=0.13.8

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM ${BASE_IMAGE}

ARG PYTHON_VERSION=3.11.7
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git: DVC needs it in the mounted repo, which belongs to the host user, hence
# safe.directory '*'. make: the default command. Apt versions are not pinned:
# the base image tag fixes the Ubuntu release (see .hadolint.yaml, DL3008).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates \
        git \
        make \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system safe.directory '*'

# CPython ${PYTHON_VERSION} (python-build-standalone, via uv) in /opt/python and
# the venv in /opt/venv. Both root-owned and world-readable, so any UID can use
# them. Ubuntu's own python3 is 3.12, and the lock is compiled for 3.11.
COPY --from=uv /uv /usr/local/bin/uv
RUN UV_PYTHON_INSTALL_DIR=/opt/python uv python install --no-cache --no-bin "${PYTHON_VERSION}" \
    && py="$(UV_PYTHON_INSTALL_DIR=/opt/python uv python find --managed-python --no-python-downloads "${PYTHON_VERSION}")" \
    && "${py}" -m venv /opt/venv \
    && /opt/venv/bin/python -c "import platform, sys; v = platform.python_version(); sys.exit(0 if v == '${PYTHON_VERSION}' else 'python ' + v)"

# VENV and EDGERLHF_IMAGE tell the Makefile that the environment is already
# built here: `make setup` must not create a .venv inside the mounted repo.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    VENV=/opt/venv \
    EDGERLHF_IMAGE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The same two steps as `make setup`: torch first, pinned, from the variant's
# index (it brings its own nvidia-*/triton deps), then exactly requirements.lock
# with --no-deps, so pip can neither replace torch nor add anything unlocked.
COPY requirements.lock /opt/edgerlhf/requirements.lock
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -m pip install --no-cache-dir --no-deps -r /opt/edgerlhf/requirements.lock \
    && python -m pip check \
    && python -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '${TORCH_VERSION}' else 'torch ' + torch.__version__)"

# The project itself, editable and rooted at /workspace: the repo mounted there at
# run time shadows this copy, so `import edgerlhf` reads the mounted sources.
# README/LICENSE are optional (the globs may match nothing); pyproject.toml may
# refer to them.
WORKDIR /workspace
COPY pyproject.toml README.md* LICENSE* ./
COPY edgerlhf/ ./edgerlhf/
RUN python -m pip install --no-cache-dir --no-deps -e . \
    && python -m pip check \
    && python -c "import edgerlhf"

# Non-root user edgerlhf (uid/gid 1000). Ubuntu 24.04 images ship a user `ubuntu`
# with uid 1000, so it goes first. HOME and the HF cache are world-writable
# (sticky, like /tmp) so `docker run --user "$(id -u):$(id -g)"` works with any
# host UID; USER/LOGNAME stop getpass.getuser() failing for a UID without a
# passwd entry (torch's compile caches call it).
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
    && groupadd --gid 1000 edgerlhf \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash edgerlhf \
    && mkdir -p /cache/huggingface \
    && chmod 1777 /cache /cache/huggingface /home/edgerlhf \
    && chown -R edgerlhf:edgerlhf /workspace

ENV HOME=/home/edgerlhf \
    USER=edgerlhf \
    LOGNAME=edgerlhf \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DVC_NO_ANALYTICS=1 \
    MPLBACKEND=Agg

VOLUME ["/cache/huggingface"]

# Numeric, so runtimes can verify non-root without reading /etc/passwd (DL3066).
USER 1000:1000

CMD ["make", "all"]
