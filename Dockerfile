# syntax=docker/dockerfile:1
# cmsync container image:
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) -t cmsync .
# then `docker run cmsync run` (the default command).
# Two stages: the builder installs the locked dependencies, then the package (with the event
# schema inside it, package data), into a virtualenv; the runtime copies only that virtualenv.
# Non-root, no secrets: settings and credentials come from the environment or mounted files at
# run time (see k8s/).

# Pinned by tag and by the digest of its multi-architecture index (amd64 and arm64), so a
# rebuild gets the same base. To move to a newer patch release: change both, e.g. from
# `docker buildx imagetools inspect python:3.11.x-slim-bookworm`.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependency layer first: rebuilt only when a lock changes, not on every code change. Every
# file is checked against the lock's hashes (requirements/*.txt, written by `make lock`).
COPY requirements/runtime.txt requirements/build.txt requirements/
RUN python -m venv /opt/cmsync/venv \
 && /opt/cmsync/venv/bin/pip install --require-hashes -r requirements/runtime.txt \
 && python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes -r requirements/build.txt
# Then the code: the package alone, with no dependency resolution of its own (--no-deps) and
# the locked build backend (--no-build-isolation).
COPY pyproject.toml README.md LICENSE ./
COPY consumer/ consumer/
COPY schemas/ schemas/
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
 && /opt/cmsync/venv/bin/pip install --no-deps /tmp/dist/*.whl \
 && /opt/cmsync/venv/bin/python -m compileall -q /opt/cmsync/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.0.0+unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="cmsync" \
      org.opencontainers.image.description="Streaming sync from segment membership on Kafka to Campaign Monitor lists" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
RUN groupadd --system --gid 10001 cmsync \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin cmsync
COPY --from=builder /opt/cmsync/venv /opt/cmsync/venv
ENV PATH=/opt/cmsync/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CMSYNC_HTTP_PORT=9400
USER 10001:10001
WORKDIR /opt/cmsync
EXPOSE 9400
ENTRYPOINT ["cmsync"]
CMD ["run"]
