#!/usr/bin/env bash
# The offline base image for the Dockerfile: Debian bookworm (debootstrap minbase) with
# Python 3.11, `docker import`ed, so the sidecar image builds where no registry answers.
#
#   image/build-base-image.sh [IMAGE]        # IMAGE defaults to discoproxy-base:bookworm
#   docker build --build-arg BASE=discoproxy-base:bookworm -t discoproxy .
#
# It matches what the Dockerfile expects of any base (python:3.11-slim-bookworm is the
# public one): `python3` 3.11 with venv/ensurepip, CA certificates, useradd, setpriv.
#
# Cached twice, both keyed by this script's own hash (change the script, get a new base):
# - the image carries the label discoproxy.base.key; when the engine already has IMAGE with
#   this key, the script does nothing;
# - the root filesystem is kept as base-bookworm-<key>.tar.gz in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/discoproxy/, so a fresh engine re-imports it in seconds
#   instead of running debootstrap again (about a minute).
# `--rebuild` ignores both (e.g. to pick up a Debian point release).
#
# Needs root (debootstrap) and `apt-get install debootstrap`; exits 3 when either is
# missing. DEBIAN_MIRROR picks the mirror.
set -euo pipefail

rebuild=false
if [ "${1:-}" = "--rebuild" ]; then
    rebuild=true
    shift
fi
image=${1:-discoproxy-base:bookworm}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,ca-certificates
cache=${XDG_CACHE_HOME:-$HOME/.cache}/discoproxy
key=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
tarball=$cache/base-$suite-$key.tar.gz

image_is_current() {
    [ "$(docker image inspect --format '{{ index .Config.Labels "discoproxy.base.key" }}' \
        "$image" 2>/dev/null)" = "$key" ]
}

if ! $rebuild && image_is_current; then
    echo "$image is up to date (key $key)"
    exit 0
fi

mkdir -p "$cache"
# One builder at a time per cache dir: a second caller waits, then finds the image there.
exec 9>"$cache/base.lock"
flock 9
if ! $rebuild && image_is_current; then
    echo "$image is up to date (key $key)"
    exit 0
fi

started=$SECONDS
if $rebuild || [ ! -s "$tarball" ]; then
    [ "$(id -u)" = 0 ] || { echo "debootstrap needs root: run this script as root" >&2; exit 3; }
    command -v debootstrap >/dev/null || {
        echo "debootstrap not found: apt-get install debootstrap" >&2
        exit 3
    }
    root=$(mktemp -d /var/tmp/discoproxy-base.XXXXXX)
    trap 'rm -rf "$root" "$tarball.partial"' EXIT
    echo "--- debootstrap --variant=minbase --include=$packages $suite ($mirror)"
    debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
        >"$root.log" 2>&1 || { tail -30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
    rm -f "$root.log"
    # Nothing a container needs: downloaded packages, package lists, docs, logs.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/var/log/* "$root"/var/cache/debconf/*-old
    # /dev, /proc and /sys are provided by the engine at run time.
    tar --numeric-owner --xattrs -C "$root" \
        --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* -c . \
        | gzip -1 >"$tarball.partial"
    mv "$tarball.partial" "$tarball"
    rm -rf "$root"
    trap - EXIT
    # Older keys are dead weight.
    find "$cache" -maxdepth 1 -name "base-$suite-*.tar.gz" ! -name "${tarball##*/}" -delete
    echo "--- $tarball ($(du -h "$tarball" | cut -f1)) in $((SECONDS - started)) s"
fi

echo "--- docker import $tarball $image"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL discoproxy.base.key=$key discoproxy.base.suite=$suite" \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$image" >/dev/null
echo "--- $image ready in $((SECONDS - started)) s"
