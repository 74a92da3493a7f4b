#!/usr/bin/env bash
# Builds Switchyard's container images with no image registry: each image is
# FROM scratch, holding a binary built on this host, the shared libraries it
# loads (found with ldd), switchyard-probe for health checks, and an
# /etc/nsswitch.conf so service names resolve through Docker's DNS.
#
#   scripts/images.sh [--profile release|dev] [--no-build] [--tag TAG]
#
# --profile  which cargo profile's binaries go in (default release)
# --no-build use the binaries already built for that profile
# --tag      image tag (default: the workspace version, which
#            docker-compose.yml uses unless SWITCHYARD_TAG says otherwise)
#
# Images: switchyard/{nlb,alb,echo-module,demo-origin}:TAG. Binaries are
# copied without their debug sections (symbols stay, for backtraces).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=1
tag=""
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs release or dev}"; shift 2 ;;
        --no-build) build=0; shift ;;
        --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) cargo_profile=(--release); dir=release ;;
    dev|debug) cargo_profile=(); dir=debug ;;
    *) echo "images.sh: --profile must be release or dev, not $profile" >&2; exit 2 ;;
esac

command -v docker >/dev/null || { echo "images.sh: docker is not installed" >&2; exit 1; }
command -v ldd >/dev/null || { echo "images.sh: ldd is not installed (Debian: libc-bin)" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
tag="${tag:-$version}"
target="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target/$dir"

if [ "$build" = 1 ]; then
    cargo build "${cargo_profile[@]}" -p nlb -p alb -p echo-module -p switchyard-tools --bins
fi

# image name, its binary, the ports it listens on
images=(
    "nlb nlb 8080 7000 50051 9090"
    "alb alb 8080 50061 9101"
    "echo-module echo-module 7001 50061 9101"
    "demo-origin demo-origin 8000"
)

# Copies a binary's shared libraries (and the dynamic loader) into a root.
copy_libs() {
    local exe="$1" root="$2" lib
    for lib in $(ldd "$exe" | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

stage="$target/docker"
for entry in "${images[@]}"; do
    read -r name exe ports <<<"$entry"
    [ -x "$bin/$exe" ] || { echo "images.sh: $bin/$exe is missing; build it or drop --no-build" >&2; exit 1; }
    ctx="$stage/$name"
    rm -rf "$ctx"
    mkdir -p "$ctx/root/usr/local/bin" "$ctx/root/etc" "$ctx/state"
    for b in "$exe" switchyard-probe; do
        strip --strip-debug -o "$ctx/root/usr/local/bin/$b" "$bin/$b"
    done
    copy_libs "$bin/$exe" "$ctx/root"
    copy_libs "$bin/switchyard-probe" "$ctx/root"
    printf 'hosts: files dns\n' >"$ctx/root/etc/nsswitch.conf"
    printf 'root:x:0:0:root:/:/nonexistent\nswitchyard:x:65532:65532:switchyard:/:/nonexistent\n' >"$ctx/root/etc/passwd"
    printf 'root:x:0:\nswitchyard:x:65532:\n' >"$ctx/root/etc/group"
    expose=""
    for p in $ports; do expose="$expose $p/tcp"; done
    {
        echo "FROM scratch"
        echo "COPY root/ /"
        # The NLB's state directory, writable by the unprivileged user; a
        # named volume mounted there starts with this owner.
        [ "$name" = nlb ] && echo "COPY --chown=65532:65532 state/ /var/lib/switchyard/"
        echo "USER 65532:65532"
        echo "EXPOSE$expose"
        echo "ENTRYPOINT [\"/usr/local/bin/$exe\"]"
        echo "LABEL org.opencontainers.image.title=\"switchyard-$name\" org.opencontainers.image.version=\"$version\" org.opencontainers.image.licenses=\"Apache-2.0\""
    } >"$ctx/Dockerfile"
    echo "== switchyard/$name:$tag ($profile)"
    if ! out="$(docker build --quiet -t "switchyard/$name:$tag" "$ctx" 2>&1)"; then
        echo "$out" >&2
        echo "images.sh: docker build of switchyard/$name:$tag failed" >&2
        exit 1
    fi
    docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "switchyard/$name:$tag"
done
