# syntax=docker/dockerfile:1
# The operator image: `inferencefleet operator` (kopf). It installs the project's `operator`
# extra at the locked versions, and nothing else: no PyTorch, no gRPC. The dependencies and the
# project's own code are separate layers: an edit of the code rebuilds only the small one.
#
#   docker build -f docker/operator.Dockerfile -t REGISTRY/inferencefleet-operator:TAG .
#   docker push REGISTRY/inferencefleet-operator:TAG
#   helm upgrade --install ... --set image.repository=REGISTRY/inferencefleet-operator \
#       --set image.tag=TAG
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The operator extra's dependencies, resolved from the project's metadata alone (empty package
# folders and README), at the locked versions.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/inferencefleet
COPY requirements.lock pyproject.toml ./
RUN mkdir server operator && touch README.md \
 && /opt/inferencefleet/bin/pip install --constraint requirements.lock ".[operator]" \
 && /opt/inferencefleet/bin/pip uninstall --yes inferencefleet

# The project itself, as a wheel without dependencies.
FROM deps AS wheel
COPY README.md ./
COPY server/ server/
COPY operator/ operator/
RUN /opt/inferencefleet/bin/pip wheel --no-deps --wheel-dir /wheel .

# The image: the dependency stage as it is (its layers cached and shared between builds), and
# the project's wheel installed on top.
FROM deps
COPY --from=wheel /wheel /tmp/wheel
COPY crds/inferencefleet.yaml /opt/inferencefleet/crds/inferencefleet.yaml
RUN /opt/inferencefleet/bin/pip install --no-deps --no-cache-dir /tmp/wheel/*.whl \
 && rm -rf /tmp/wheel /src \
 && INFERENCEFLEET_CRD=/opt/inferencefleet/crds/inferencefleet.yaml \
    /opt/inferencefleet/bin/python -c "import fleet_operator.main, fleet_spec.spec as s; s.crd()"
WORKDIR /
ENV PATH=/opt/inferencefleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    USER=inferencefleet \
    INFERENCEFLEET_CRD=/opt/inferencefleet/crds/inferencefleet.yaml
# Non-root, numeric (the chart sets runAsNonRoot and a read-only root filesystem). The UID
# has no passwd entry: USER above names it for kopf's peering identity (getpass.getuser()).
USER 65532:65532
# The health endpoint (/healthz) for the liveness probe and `helm test`.
EXPOSE 8080
ENTRYPOINT ["inferencefleet", "operator"]
