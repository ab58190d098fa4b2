# satkit in a container, on the CPU or on NVIDIA GPUs (one Dockerfile, two variants).
#
#   docker build -t satkit .                                    # CPU: torch's CPU wheels (small)
#   docker build -t satkit:cuda --build-arg TORCH=cuda .        # GPU: PyPI's CUDA wheels of torch
#   docker run --rm -v "$PWD:/data" satkit satdata build --source digits --out /data/digits.zarr
#   docker run --rm --gpus all -v "$PWD:/data" satkit:cuda sattrain run /data/digits.zarr --device cuda
#
# .ci/docker builds both variants and smoke-tests them where docker exists.
FROM python:3.11-slim

ARG TORCH=cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/satkit

# 1. Dependencies, in a layer that only pyproject.toml changes invalidate: the packages are
# stubs here, installed for their dependencies and removed again. torch and torchvision come
# first, from torch's CPU index for the CPU variant and from PyPI (CUDA 12 wheels) for cuda.
# [remote]: stores at URLs (https://, s3://) and `satdata fetch`; [dask]: --dask builds.
COPY pyproject.toml README.md ./
RUN set -eux; \
    pip install --upgrade pip; \
    if [ "$TORCH" = "cpu" ]; then \
      pip install "torch>=2.3,<=2.14.1" "torchvision>=0.18,<=0.29.1" --index-url https://download.pytorch.org/whl/cpu; \
    elif [ "$TORCH" != "cuda" ]; then \
      echo "TORCH must be cpu or cuda, not $TORCH" >&2; exit 2; \
    fi; \
    mkdir satdata sattrain && touch satdata/__init__.py sattrain/__init__.py; \
    pip install ".[remote,dask]"; \
    pip uninstall -y satkit; rm -rf satdata sattrain build *.egg-info

# 2. The code: edits rebuild from here on, in seconds.
COPY satdata ./satdata
COPY sattrain ./sattrain
COPY manifests ./manifests
COPY docs ./docs
RUN pip install --no-deps . && satdata --version && sattrain --version

WORKDIR /data
CMD ["satdata", "--help"]
