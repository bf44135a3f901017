# syntax=docker/dockerfile:1
# cmsync container image: `docker build -t cmsync .`, then `docker run cmsync run` (the default).
# Two stages: the builder installs the package and its dependencies into a virtualenv; the
# runtime copies only that virtualenv and the JSON schemas. Non-root, no secrets: settings and
# credentials come from the environment at run time (see k8s/).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/cmsync/venv
WORKDIR /src
# Metadata first: the dependency layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY consumer/ consumer/
RUN /opt/cmsync/venv/bin/pip install --upgrade pip \
 && /opt/cmsync/venv/bin/pip install . \
 && /opt/cmsync/venv/bin/python -m compileall -q /opt/cmsync/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cmsync" \
      org.opencontainers.image.description="Streaming sync from segment membership on Kafka to Campaign Monitor lists" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 cmsync \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin cmsync
COPY --from=builder /opt/cmsync/venv /opt/cmsync/venv
# The decoder reads schemas/segment-membership.v1.json; in the image it lives here.
COPY schemas/ /opt/cmsync/schemas/
ENV PATH=/opt/cmsync/venv/bin:$PATH \
    CMSYNC_SCHEMA_DIR=/opt/cmsync/schemas \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CMSYNC_HTTP_PORT=9400
USER 10001:10001
WORKDIR /opt/cmsync
EXPOSE 9400
ENTRYPOINT ["cmsync"]
CMD ["run"]
