# kopa's container image.
#
#   docker build --build-arg COMMIT=$(git rev-parse --short HEAD) --build-arg VERSION=1.2.3 -t kopa .
#   docker build --build-arg COMMIT=$(git rev-parse --short HEAD) --target test .   # only the unit tests
#
# There is no .git in the build context (.dockerignore), so the version and the commit that `kopa --version`
# prints come from the build arguments: COMMIT is required, VERSION (PEP 440) defaults to 0.0.0.
#
# Stages: `build` makes the wheel (as tests/integration/test_image.py does without a container engine) and
# a virtual environment with kopa and its pinned dependencies; `test` runs the unit tests with those
# dependencies; `runtime` is the image: the Python base and the virtual environment, nothing else (no
# compilers, no pip, no sources). The runtime stage copies a file from `test`, so a plain `docker build`
# runs the unit tests and fails when they fail, as kube-mgmt's build does.
#
# The base is Debian slim because the Helm chart's init container runs /bin/sh and coreutils from this image.

# By tag; for reproducible builds pin the digest your registry resolves it to, e.g.
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> ...
# (docker buildx imagetools inspect python:3.11-slim-bookworm prints it).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VERSION=0.0.0
ARG COMMIT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
# setuptools-scm takes the version and the commit from the build arguments, and writes app/_version.py
# (the build is in-tree, so the test stage's sources have it too).
RUN test -n "${COMMIT}" || { echo "build with --build-arg COMMIT=\$(git rev-parse --short HEAD)" >&2; exit 1; } \
 && SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}" SETUPTOOLS_SCM_PRETEND_METADATA="{node=\"g${COMMIT}\"}" \
    python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/kopa \
 && /opt/kopa/bin/pip install --constraint constraints.txt /wheels/kopa-*.whl \
 && /opt/kopa/bin/python -m compileall -q /opt/kopa/lib

FROM build AS test
# The rest of the context (tests, devstack, config.example.yaml, ...); the unit tests run with the pinned
# dependencies of the image's virtual environment plus the dev extras.
COPY . ./
RUN /opt/kopa/bin/pip install --constraint constraints.txt "$(ls /wheels/kopa-*.whl)[dev]" \
 && /opt/kopa/bin/python -m pytest tests/unit -p no:cacheprovider -q \
 && touch /unit-tests-passed

FROM build AS venv
# The runtime needs no pip inside the virtual environment.
RUN /opt/kopa/bin/python -m pip uninstall --yes --quiet pip

FROM ${PYTHON_IMAGE} AS runtime
# Nothing is built or installed at run time: drop the base image's packaging tools as well.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && rm -rf /root/.cache
COPY --from=test /unit-tests-passed /opt/kopa-unit-tests-passed
COPY --from=venv /opt/kopa /opt/kopa
ENV PATH=/opt/kopa/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The build arguments again (an ARG's scope is its stage), for the image's OCI labels.
ARG PYTHON_IMAGE
ARG VERSION=0.0.0
ARG COMMIT
LABEL org.opencontainers.image.title="kopa" \
      org.opencontainers.image.description="Keeps Open Policy Agent in sync with Kubernetes: a successor of kube-mgmt." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# kopa's health endpoint (/healthz, /readyz, /metrics): --health-endpoint, the chart's mgmt.healthPort.
EXPOSE 8000
# The same uid and gid as the Helm chart's securityContext; no home directory, no shell login.
USER 65532:65532
ENTRYPOINT ["kopa"]
