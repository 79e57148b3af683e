# psrv in a container: `docker compose up --build` (see docker-compose.yml), or, without a registry
# or index, from local wheels: `scripts/compose_up.sh` (see README, "Docker and podman").
#
# The image runs `python -m psrv.cluster.entrypoint server|worker ARGS`: it shapes the container's
# eth0 with tc from PSRV_RATE_UP / PSRV_RATE_DOWN (the same code as `psrv cluster run`; needs
# cap_add NET_ADMIN, and the ifb module on the Docker host for the downlink), then runs
# `psrv start-server` / `psrv start-worker` with ARGS.
#
# Build arguments:
#   BASE_IMAGE      a Debian-based image with python3 (3.11) and python3-venv; default python:3.11-slim
#   PIP_NO_INDEX    1: pip installs only from PIP_FIND_LINKS, no index is contacted
#   PIP_FIND_LINKS  /wheels: the build context's wheels/ folder (a wheelhouse made on the host by
#                   `scripts/compose_up.sh wheels`)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL  another index (e.g. https://download.pytorch.org/whl/cpu for
#                   the CPU torch wheel from an ordinary PyPI)
# e.g. podman build --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels -t psrv:latest .
# The wheels are bind-mounted for the install steps (RUN --mount), so they are not a layer of the image.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# pip reads these from the environment; unset (the default), pip uses its index as usual
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

# iproute2: ip and tc, for the shaping at start (apt only if the base image lacks them)
RUN command -v tc >/dev/null && command -v ip >/dev/null || { apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*; }

# A virtual environment first on PATH: `python` is the same command on python:3.11-slim and on a
# plain Debian base (whose system Python refuses pip installs, PEP 668)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

# torch first, pinned, as in the README's install command (the CPU wheel; pyproject keeps a range
# that it satisfies, so installing the package pulls nothing larger). Its own layer: it is the big one.
RUN --mount=type=bind,source=wheels,target=/wheels \
    python -m pip install --no-cache-dir torch==2.13.0

# then the other dependencies, as pyproject.toml lists them: a change of the sources alone reinstalls
# only psrv (seconds), not these
COPY pyproject.toml ./
RUN --mount=type=bind,source=wheels,target=/wheels \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt

COPY README.md ./
COPY protos ./protos
COPY psrv ./psrv
COPY worker ./worker
RUN --mount=type=bind,source=wheels,target=/wheels \
    python -m pip install --no-cache-dir . \
    && python -c "import psrv.cli, psrv.cluster.entrypoint"

ENV PYTHONUNBUFFERED=1
VOLUME ["/out"]
ENTRYPOINT ["python", "-m", "psrv.cluster.entrypoint"]
CMD ["--help"]
