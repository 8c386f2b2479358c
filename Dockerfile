# syntax=docker/dockerfile:1
# One image for the Ray head, the GPU workers (Ray cluster launcher: deploy/cluster.yaml; KubeRay:
# deploy/rayjob.yaml), the MLflow server (deploy/mlflow.yaml) and a local sweep:
#
#   docker build -t ghcr.io/OWNER/tune-bir:0.1.0 .
#   docker run --rm --gpus all -v "$PWD/out:/home/ray/work" ghcr.io/OWNER/tune-bir:0.1.0   # default sweep
#
# Base image: python:3.11-slim rather than nvidia/cuda. The PyPI torch wheel for linux x86_64 pinned in
# constraints.txt depends on the nvidia-*-cu13 wheels (CUDA 13 runtime, cuBLAS, cuDNN, NCCL), so the CUDA
# user-space libraries come with `pip install`; an nvidia/cuda base would only add a second copy. What the
# container needs from the host is the NVIDIA driver (>= 580 for CUDA 13), which the NVIDIA container
# toolkit mounts in (`docker run --gpus`, the launcher's `--runtime=nvidia`, the Kubernetes device plugin).
# Python 3.11 is the version CI tests with; the Debian release is pinned (trixie) so that a rebuild does
# not move to another one. linux/amd64 only (the CUDA wheels in constraints.txt are x86_64 builds).
ARG PYTHON_IMAGE=python:3.11-slim-trixie

# ---- build: a virtualenv at /opt/venv with the pinned dependencies and the project ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The pinned dependencies first, in their own layer: editing the code does not re-download torch.
COPY constraints.txt ./
RUN pip install --no-cache-dir pip==26.3 \
 && pip install --no-cache-dir -r constraints.txt
# Then the project (what .dockerignore lets through) with the cluster extra: ray[default] brings the
# dashboard and the job API that `ray job submit` and KubeRay's job submitter talk to.
COPY . .
RUN pip install --no-cache-dir -c constraints.txt '.[cluster]' \
 && python -c "import tune_bir, trainables, search_spaces, analysis, ray, torch, mlflow"

# ---- runtime ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# rsync: the Ray cluster launcher copies its bootstrap files into the container with
#   `rsync -e 'docker exec -i'`; wget: KubeRay's exec liveness/readiness probes and the head's MLflow
#   health check in deploy/cluster.yaml.
# No version pins: these come from the pinned Debian release of the base image and are not part of
# what a sweep computes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends rsync wget \
 && rm -rf /var/lib/apt/lists/*
# A non-root user. uid/gid 1000 is the ssh user of the usual cloud images (ubuntu), so the files that the
# cluster launcher mounts into the container (~/ray_bootstrap_config.yaml) are readable without sudo;
# the name and home match the rayproject/ray images that Ray's tooling assumes (/home/ray).
RUN groupadd --gid 1000 ray \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray --shell /bin/bash ray \
 && install -d -o ray -g ray /home/ray/work
# The venv belongs to `ray` so that a node's setup commands can add a package (e.g. boto3 for the AWS
# autoscaler on the head) without root.
COPY --from=build --chown=ray:ray /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLBACKEND=Agg \
    RAY_USAGE_STATS_ENABLED=0
# Numeric, so that Kubernetes' runAsNonRoot can verify it (= the user `ray` created above).
USER 1000:1000
# Results of a local run land here (./ray_results, ./mlflow.db, ./data, ./results): mount a volume on it.
WORKDIR /home/ray/work
# Ray GCS, dashboard / job API, Ray client, MLflow (documentation; the launcher uses the host network).
EXPOSE 6379 8265 10001 5000
# No ENTRYPOINT: the cluster launcher starts the container with `bash`, KubeRay with its own command.
CMD ["python", "-m", "tune_bir.sweep"]
