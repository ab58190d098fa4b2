# satkit on CPU or CUDA. Build:  docker build -t satkit .
# Run:    docker run --rm -v "$PWD:/data" satkit satdata build --source digits --out /data/digits.zarr
# GPU:    docker run --rm --gpus all -v "$PWD:/data" satkit sattrain run /data/digits.zarr --device cuda
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/satkit

# Dependencies first (cached while only the code changes).
COPY pyproject.toml README.md ./
COPY satdata ./satdata
COPY sattrain ./sattrain
# [remote]: stores at URLs (https://, s3://) and `satdata fetch`, as a lab shares them;
# [dask]: `satdata build/saliency --dask` on a Dask cluster (torchrun comes with torch).
RUN pip install --upgrade pip && pip install ".[remote,dask]"

COPY manifests ./manifests
COPY docs ./docs

WORKDIR /data
CMD ["satdata", "--help"]
