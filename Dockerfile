# One image for every cancelflow process: the six services, the topic setup and the sandboxes.
# There is no default command: each docker-compose.yml service says what to run, e.g.
#   docker run --rm cancelflow:local python -m billing
FROM python:3.11-slim

# Services bind loopback by default (CANCELFLOW_HTTP_HOST); in a container, health checks come from outside.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CANCELFLOW_HTTP_HOST=0.0.0.0 \
    CANCELFLOW_DATA_DIR=/var/lib/cancelflow

RUN groupadd --system --gid 10001 cancelflow \
    && useradd --system --uid 10001 --gid cancelflow --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin cancelflow \
    && mkdir -p /var/lib/cancelflow \
    && chown cancelflow:cancelflow /var/lib/cancelflow

WORKDIR /app

# What the build needs: pyproject.toml names README.md and the package folders (see .dockerignore).
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY tooling ./tooling
RUN pip install .

USER cancelflow
