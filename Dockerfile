# kopa's container image. Build: docker build --build-arg VERSION=$(git describe --tags --always) -t kopa .
# The wheel is built in one stage and installed into a clean virtual environment in another, so the final
# image carries no compilers, pip caches or sources.

FROM python:3.11-slim AS wheel
ARG VERSION=0.0.0
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
# No .git in the build context: setuptools-scm takes the version from the build argument instead.
RUN SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}" pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip download --no-cache-dir --dest /wheels -c constraints.txt \
      "kubernetes" "aiohttp" "anyio" "tenacity" "prometheus-client" "orjson" "PyYAML"

FROM python:3.11-slim AS runtime
COPY --from=wheel /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN python -m venv /opt/kopa \
 && /opt/kopa/bin/pip install --no-cache-dir --no-index --find-links /wheels -c /tmp/constraints.txt kopa \
 && rm -rf /wheels /tmp/constraints.txt
USER 65532:65532
ENV PATH=/opt/kopa/bin:$PATH PYTHONUNBUFFERED=1
ENTRYPOINT ["kopa"]
