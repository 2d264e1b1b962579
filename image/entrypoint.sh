#!/bin/sh
# Entry point of the sidecar image: `discoproxy "$@"` as the unprivileged user discoproxy,
# with the Docker socket's group added so it can list, watch and start containers.
#
# Why adopt the socket's group here instead of `group_add` in compose: the group owning
# /var/run/docker.sock is the host's `docker` group, whose gid differs from host to host
# (999, 998, 133, 0 on Docker Desktop …). An image cannot know it in advance, and a
# `group_add: ["${DOCKER_GID}"]` would make every user look it up before compose.example.yml
# works. So the container starts as root only long enough to read the socket's gid, then
# setpriv drops to uid/gid discoproxy with that gid as a supplementary group, no
# capabilities and no_new_privs, and execs discoproxy (PID 1 is discoproxy itself).
#
# Started as non-root instead (`user: "10001:10001"` plus `group_add: [<socket gid>]`),
# nothing is changed: discoproxy runs as that user directly.
set -eu

if [ "$(id -u)" != 0 ]; then
    exec discoproxy "$@"
fi

uid=$(id -u discoproxy)
gid=$(id -g discoproxy)
groups=$gid
case "${DOCKER_HOST:-unix:///var/run/docker.sock}" in
    unix://*) socket=${DOCKER_HOST:-unix:///var/run/docker.sock}; socket=${socket#unix://} ;;
    *) socket= ;;
esac
if [ -n "$socket" ] && [ -S "$socket" ]; then
    socket_gid=$(stat -c %g "$socket")
    [ "$socket_gid" = "$gid" ] || groups=$gid,$socket_gid
fi

exec setpriv --reuid="$uid" --regid="$gid" --groups="$groups" --inh-caps=-all \
    --no-new-privs -- discoproxy "$@"
