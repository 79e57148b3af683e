# psrv in a container: `docker compose up --build` (see docker-compose.yml).
#
# The image runs `python -m psrv.cluster.entrypoint server|worker ARGS`: it shapes the container's
# eth0 with tc from PSRV_RATE_UP / PSRV_RATE_DOWN (the same code as `psrv cluster run`; needs
# cap_add NET_ADMIN, and the ifb module on the Docker host for the downlink), then runs
# `psrv start-server` / `psrv start-worker` with ARGS.
FROM python:3.11-slim

# iproute2: ip and tc, for the shaping at start
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first, pinned, as in the README's install command (the CPU wheel; pyproject keeps a range
# that it satisfies, so installing the package pulls nothing larger). Its own layer: it is the big one.
RUN python -m pip install --no-cache-dir torch==2.13.0

COPY pyproject.toml README.md ./
COPY protos ./protos
COPY psrv ./psrv
COPY worker ./worker
RUN python -m pip install --no-cache-dir . \
    && python -c "import psrv.cli, psrv.cluster.entrypoint"

ENV PYTHONUNBUFFERED=1
VOLUME ["/out"]
ENTRYPOINT ["python", "-m", "psrv.cluster.entrypoint"]
CMD ["--help"]
