#!/usr/bin/env bash
# Build psrv's image from local wheels and run docker-compose.yml (a server and 4 workers on tc-shaped
# links), with Docker or podman, without a container registry or a package index during the build.
#
#   scripts/compose_up.sh [STEP...] [-- compose-up args]
#
# Steps (default: wheels build up):
#   setup   podman only: install podman, runc, iptables, netavark, aardvark-dns, debootstrap with apt
#           (root) when missing; make a Debian bookworm base image with python3 from the apt mirror
#           (debootstrap, no registry) when PSRV_BASE_IMAGE is not there; podman-compose in a venv.
#   wheels  the wheelhouse: `pip download` of torch==2.13.0, setuptools, wheel and psrv's dependencies
#           (from pyproject.toml) into wheels/ of the build context, for CPython 3.11 manylinux on this
#           machine's architecture, through the host's pip configuration (index, find-links, cache).
#           Skipped while wheels/.stamp matches that list.
#   build   `ENGINE build --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels` (podman: and
#           --network none, so nothing is fetched) -> $PSRV_IMAGE.
#   up      `compose up --abort-on-container-exit --exit-code-from server` in the project folder, then
#           `compose down` (containers, pod and network removed; also on failure or Ctrl-C).
#
# Environment:
#   PSRV_ENGINE      docker | podman (default: docker if `docker info` answers, else podman)
#   PSRV_IMAGE       image tag (default psrv:latest, as in docker-compose.yml)
#   PSRV_BASE_IMAGE  FROM image (default python:3.11-slim, pulled by the build where a registry answers;
#                    localhost/debpy:bookworm when `setup` made it and python:3.11-slim is not here)
#   PSRV_PROJECT     compose project name (default psrv); PSRV_OUT: the containers' /out (default
#                    ./psrv-out); PSRV_ROUNDS, PSRV_ALGORITHM, W2_RATE_UP, ...: see docker-compose.yml
#   PSRV_CACHE       podman's config, the base rootfs tarball and the podman-compose venv
#                    (default ~/.cache/psrv-containers)
#   PSRV_COMPOSE_DIR where docker-compose.yml is run (default: the repository; a copy elsewhere
#                    works too: the image is built here, `up` does not build)
#   COMPOSE_FILE     compose files, ':'-separated (read by docker compose and podman-compose), e.g.
#                    docker-compose.yml:docker-compose.tls.yml for mutual TLS and worker tokens, with
#                    the credentials made first: psrv certs $PSRV_OUT/tls --workers 4 --host server
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${PSRV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/psrv-containers}
IMAGE=${PSRV_IMAGE:-psrv:latest}
PROJECT=${PSRV_PROJECT:-psrv}
COMPOSE_DIR=${PSRV_COMPOSE_DIR:-$ROOT}
DEBPY=localhost/debpy:bookworm

say() { printf 'compose_up: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

engine() {
    if [ -n "${PSRV_ENGINE:-}" ]; then echo "$PSRV_ENGINE"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
    else echo podman; fi
}
ENGINE=$(engine)
case $ENGINE in docker|podman) ;; *) die "PSRV_ENGINE must be docker or podman, got '$ENGINE'";; esac
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && [ -f "$CACHE/containers.conf" ]; then
    export CONTAINERS_CONF="$CACHE/containers.conf"
fi

compose() {
    if [ "$ENGINE" = docker ]; then docker compose -p "$PROJECT" "$@"
    elif [ -x "$CACHE/venv/bin/podman-compose" ]; then "$CACHE/venv/bin/podman-compose" -p "$PROJECT" "$@"
    elif command -v podman-compose >/dev/null; then podman-compose -p "$PROJECT" "$@"
    else die "no podman-compose: run '$0 setup' (or pip install podman-compose)"; fi
}

base_image() {
    if [ -n "${PSRV_BASE_IMAGE:-}" ]; then echo "$PSRV_BASE_IMAGE"
    elif [ "$ENGINE" = podman ] && ! podman image exists python:3.11-slim && podman image exists "$DEBPY"; then echo "$DEBPY"
    else echo python:3.11-slim; fi
}

step_setup() {
    [ "$ENGINE" = podman ] || { say "setup: only for podman (Docker: install it your way)"; return 0; }
    mkdir -p "$CACHE"
    local need=()
    for tool in podman runc iptables; do command -v "$tool" >/dev/null || need+=("$tool"); done
    if [ ${#need[@]} -gt 0 ] || { ! podman image exists python:3.11-slim && ! command -v debootstrap >/dev/null; }; then
        [ "$(id -u)" = 0 ] || die "setup: needs root to install podman (missing: ${need[*]:-debootstrap})"
        command -v apt-get >/dev/null || die "setup: no apt-get: install podman, runc and iptables yourself"
        say "setup: apt-get install podman runc iptables netavark aardvark-dns debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || die "setup: apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc iptables netavark aardvark-dns \
            debootstrap >&2 || die "setup: apt-get install failed"
    fi
    # runc: crun 1.8 (Debian 12) rejects hybrid cgroup v1/v2 hosts; lower default ulimits: a host
    # without CAP_SYS_RESOURCE cannot give containers podman's default nofile/nproc
    if [ ! -f "$CACHE/containers.conf" ]; then
        local nofile; nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
        printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n[engine]\nruntime = "runc"\n' \
            "$nofile" "$nofile" > "$CACHE/containers.conf"
    fi
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$CACHE/containers.conf}
    # python:3.11-slim where a registry gave it; else a Debian base made here (no registry needed)
    podman image exists python:3.11-slim || podman image exists "$DEBPY" || make_debpy
    if [ ! -x "$CACHE/venv/bin/podman-compose" ] && ! command -v podman-compose >/dev/null; then
        python3 -m venv "$CACHE/venv" && "$CACHE/venv/bin/pip" install -q podman-compose >&2 \
            || die "setup: pip install podman-compose failed"
    fi
    # installed is not enough (an unprivileged container, no user namespaces): one container must run
    local err smoke=$DEBPY
    podman image exists python:3.11-slim && smoke=python:3.11-slim
    err=$(podman run --rm --pull never --network none "$smoke" true 2>&1 >/dev/null) \
        || die "setup: podman cannot run a container here: $(printf '%s\n' "$err" | tail -n 1)"
    say "setup: podman $(podman --version | awk '{print $3}'), base image $(base_image)"
}

make_debpy() {
    # a python3 base image without a registry: debootstrap from the Debian mirror apt uses (~1 min),
    # with the host's CA bundle, imported into podman (~6 s)
    local tar=$CACHE/debpy-bookworm-rootfs.tar mirror
    if [ ! -f "$tar" ]; then
        mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
        [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        [ -n "$mirror" ] || die "setup: no Debian mirror found in /etc/apt for debootstrap"
        say "setup: debootstrap bookworm from $mirror (python3, python3-venv, iproute2)"
        rm -rf "$CACHE/rootfs"
        debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,iproute2 \
            bookworm "$CACHE/rootfs" "$mirror" > "$CACHE/debootstrap.log" 2>&1 \
            || { rm -rf "$CACHE/rootfs"; die "setup: debootstrap failed, see $CACHE/debootstrap.log"; }
        rm -f "$CACHE"/rootfs/var/cache/apt/archives/*.deb; rm -rf "$CACHE"/rootfs/var/lib/apt/lists/*
        [ -f /etc/ssl/certs/ca-certificates.crt ] \
            && cp /etc/ssl/certs/ca-certificates.crt "$CACHE/rootfs/etc/ssl/certs/ca-certificates.crt"
        tar --numeric-owner -C "$CACHE/rootfs" -cf "$tar.part" . && mv "$tar.part" "$tar" && rm -rf "$CACHE/rootfs"
    fi
    podman import -q --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$tar" "$DEBPY" >&2
}

step_wheels() {
    local dest=$ROOT/wheels stamp deps py=${PSRV_PYTHON_VERSION:-3.11}
    # the dependencies as pyproject.toml lists them (the Dockerfile installs the same list); binary
    # wheels for the image's Python, whatever Python runs here
    deps=$(python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
        "$ROOT/pyproject.toml") || die "wheels: cannot read the dependencies of $ROOT/pyproject.toml"
    stamp=$(printf '%s\n' "$deps" | sha256sum | cut -c1-16)-$py-$(uname -m)
    if [ -f "$dest/.stamp" ] && [ "$(cat "$dest/.stamp")" = "$stamp" ]; then
        say "wheels: $dest is up to date"; return 0
    fi
    mkdir -p "$dest"; rm -f "$dest/.stamp"
    # glibc 2.17 to 2.36 (Debian 12, the base of python:3.11-slim): pip does not widen --platform itself
    local plats=() g
    for g in $(seq 36 -1 17); do plats+=(--platform "manylinux_2_${g}_$(uname -m)"); done
    plats+=(--platform "manylinux2014_$(uname -m)")
    say "wheels: pip download into $dest (CPython $py, manylinux glibc <= 2.36, $(uname -m))"
    printf '%s\n' "$deps" | python3 -m pip download -q -d "$dest" --only-binary=:all: \
        --python-version "$py" --implementation cp "${plats[@]}" \
        torch==2.13.0 'setuptools>=68' wheel -r /dev/stdin >&2 || die "wheels: pip download failed"
    echo "$stamp" > "$dest/.stamp"
}

step_build() {
    [ -n "$(ls "$ROOT"/wheels/*.whl 2>/dev/null)" ] || die "build: no wheels in $ROOT/wheels: run '$0 wheels' first"
    local base net=()
    base=$(base_image)
    [ "$ENGINE" = podman ] && net=(--network none)
    say "build: $ENGINE build $IMAGE from $base, wheels only"
    local old new
    old=$("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    "$ENGINE" build "${net[@]}" --build-arg BASE_IMAGE="$base" --build-arg PIP_NO_INDEX=1 \
        --build-arg PIP_FIND_LINKS=/wheels -t "$IMAGE" "$ROOT" >&2 || die "build: $ENGINE build failed"
    new=$("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE")
    # the image this one replaced, now untagged: removed (its layers shared with the new one stay)
    if [ -n "$old" ] && [ "$old" != "$new" ] \
        && [ -z "$("$ENGINE" image inspect --format '{{join .RepoTags ""}}' "$old" 2>/dev/null)" ]; then
        "$ENGINE" rmi "$old" >/dev/null 2>&1 || true
    fi
}

step_up() {
    cd "$COMPOSE_DIR"
    local files f out=${PSRV_OUT:-./psrv-out}
    IFS=${COMPOSE_PATH_SEPARATOR:-:} read -ra files <<< "${COMPOSE_FILE:-docker-compose.yml}"
    for f in "${files[@]}"; do
        [ -f "$f" ] || die "up: no $f in $COMPOSE_DIR"
        # the TLS override reads the credentials from /out/tls: made on the host first
        if grep -q '/out/tls/' "$f" && [ ! -f "$out/tls/ca.crt" ]; then
            die "up: $f needs $out/tls: psrv certs $out/tls --workers 4 --host server"
        fi
    done
    trap 'compose down -t 2 >/dev/null 2>&1 || true' EXIT
    trap 'exit 130' INT TERM
    say "up: project $PROJECT in $COMPOSE_DIR"
    compose up --abort-on-container-exit --exit-code-from server "$@"
}

steps=()
while [ $# -gt 0 ]; do
    case $1 in
        setup|wheels|build|up) steps+=("$1"); shift;;
        --) shift; break;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
        *) die "unknown step '$1' (setup, wheels, build, up; '--' before compose-up arguments)";;
    esac
done
[ ${#steps[@]} -gt 0 ] || steps=(wheels build up)
for s in "${steps[@]}"; do
    start=$(date +%s)
    "step_$s" "$@"
    say "$s: $(( $(date +%s) - start )) s"
done
