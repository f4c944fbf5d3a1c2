# syntax=docker/dockerfile:1
# The inference worker image: `inferencefleet serve` on a CUDA-enabled PyTorch.
#
# The PyTorch pinned in requirements.lock is PyPI's Linux x86_64 wheel, which is built with CUDA
# and brings its CUDA libraries (cuDNN, cuBLAS, NCCL, ...) as nvidia-* wheels; the container
# needs only the NVIDIA driver, which the NVIDIA container toolkit mounts at run time. Installing
# with the lock as constraints keeps the image on exactly the versions the tests ran with.
#
# Two layers matter: the dependencies (several GB, rebuilt only when requirements.lock or
# pyproject.toml change) and the project's own code (well under a MB), so that an edit of the
# code rebuilds, pushes and pulls only the small one.
#
#   docker build -f docker/worker.Dockerfile -t REGISTRY/inferencefleet-worker:TAG .
#   docker push REGISTRY/inferencefleet-worker:TAG
#   helm upgrade --install ... --set workerImage.repository=REGISTRY/inferencefleet-worker \
#       --set workerImage.tag=TAG
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The worker extra's dependencies, resolved from the project's metadata alone (empty package
# folders and README), at the locked versions.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Optional: install from a directory of wheels (e.g. mounted into the build) instead of
# downloading them, e.g. --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1.
# Unset, pip uses its index as usual.
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
WORKDIR /src
RUN python -m venv /opt/inferencefleet
COPY requirements.lock pyproject.toml ./
RUN mkdir server operator && touch README.md \
 && /opt/inferencefleet/bin/pip install --constraint requirements.lock ".[worker]" \
 && /opt/inferencefleet/bin/pip uninstall --yes inferencefleet \
 && /opt/inferencefleet/bin/python -c "import torch; assert torch.version.cuda, 'CPU-only torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The project itself, as a wheel without dependencies.
FROM deps AS wheel
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
COPY README.md ./
COPY server/ server/
COPY operator/ operator/
RUN /opt/inferencefleet/bin/pip wheel --no-deps --wheel-dir /wheel .

# The image: the dependency stage as it is (its layers cached and shared between builds), and
# the project's wheel installed on top.
FROM deps
COPY --from=wheel /wheel /tmp/wheel
# `inferencefleet tune` (the operator's tune Job) reads the fleet with the CRD's schema.
COPY crds/inferencefleet.yaml /opt/inferencefleet/crds/inferencefleet.yaml
RUN /opt/inferencefleet/bin/pip install --no-deps --no-cache-dir /tmp/wheel/*.whl \
 && rm -rf /tmp/wheel /src \
 && INFERENCEFLEET_CRD=/opt/inferencefleet/crds/inferencefleet.yaml \
    /opt/inferencefleet/bin/python -c "import fleet_server.serve, fleet_client.client, fleet_tune.tune, fleet_spec.spec as s; s.crd()"
WORKDIR /
ENV PATH=/opt/inferencefleet/bin:$PATH \
    INFERENCEFLEET_CRD=/opt/inferencefleet/crds/inferencefleet.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/tmp
# Non-root, numeric (Pod Security `restricted` checks runAsNonRoot against a numeric UID).
USER 65532:65532
# 8001: Open Inference Protocol (gRPC); 8002: Prometheus metrics.
EXPOSE 8001 8002
ENTRYPOINT ["inferencefleet", "serve"]
