#!/usr/bin/env bash
# A wheelhouse for building the image where the engine's build containers cannot reach PyPI
# although the host can (the project's CI: outgoing TLS goes through a proxy whose CA only
# the host trusts, and no such CA belongs in an image). The host downloads, the build
# installs from image/wheels/:
#
#   image/build-wheels.sh && docker build --build-arg BASE=discoproxy-base:bookworm -t discoproxy .
#
# When image/wheels/ holds wheels, the Dockerfile installs with --no-index from them only;
# when it holds none (a fresh clone), from PyPI. What lands here: every runtime dependency
# uv.lock pins (hash-checked against the lock), uv (the version the Dockerfile's UV_VERSION
# names) and the hatchling build backend, for CPython 3.11 on manylinux (the image's Python).
# Skipped when uv.lock, UV_VERSION and this script are what the last run used.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=image/wheels
uv_version=$(sed -n 's/^ARG UV_VERSION=//p' Dockerfile)
[ -n "$uv_version" ] || { echo "no 'ARG UV_VERSION=' line in Dockerfile" >&2; exit 1; }
key=$( { cat uv.lock "${BASH_SOURCE[0]}"; echo "$uv_version"; } | sha256sum | cut -c1-16)
is_current() {
    [ "$(cat "$out/.key" 2>/dev/null)" = "$key" ] && ls "$out"/*.whl >/dev/null 2>&1
}
if is_current; then
    echo "$out is up to date (key $key)"
    exit 0
fi
# One writer at a time: a second caller waits, then finds the wheels there.
lock=${XDG_CACHE_HOME:-$HOME/.cache}/discoproxy/wheels.lock
mkdir -p "${lock%/*}"
exec 9>"$lock"
flock 9
if is_current; then
    echo "$out is up to date (key $key)"
    exit 0
fi

if python3 -m pip --version >/dev/null 2>&1; then
    pip=(python3 -m pip)
else
    pip=(uvx pip)
fi
arch=$(uname -m)
target=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311
    --platform "manylinux2014_$arch")
for minor in $(seq 17 36); do
    target+=(--platform "manylinux_2_${minor}_$arch")
done

started=$SECONDS
rm -f "$out"/*.whl "$out/.key"
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
uv export --frozen --no-dev --no-emit-project --quiet -o "$requirements"
download() {
    # (a host pip.conf may name local indexes that lack most projects: not worth a line each)
    "${pip[@]}" download --quiet --disable-pip-version-check --dest "$out" "${target[@]}" "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
echo "--- wheels for uv.lock, uv==$uv_version, hatchling → $out"
download --require-hashes -r "$requirements"
download "uv==$uv_version" hatchling
echo "$key" >"$out/.key"
wheels=("$out"/*.whl)
echo "--- ${#wheels[@]} wheels in $((SECONDS - started)) s"
