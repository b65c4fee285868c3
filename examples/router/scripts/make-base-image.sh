#!/usr/bin/env bash
# Build the router example's base image without any registry: `docker import` of a tarball with
# Debian's static busybox (package busybox-static) and the few applets the worker uses.
#   DOCKER_HOST=unix:///tmp/sac/docker.sock examples/router/scripts/make-base-image.sh [IMAGE]
set -euo pipefail
image=${1:-router-example-base:latest}
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "error: no busybox at $busybox (apt-get install busybox-static)" >&2; exit 1; }
if LC_ALL=C grep -qa '/ld-linux' "$busybox"; then # dynamically linked: useless without a libc
	echo "error: $busybox is not the static busybox (apt-get install busybox-static)" >&2
	exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in sh mkdir echo cat date wc ls; do
	ln -s busybox "$root/bin/$applet"
done
docker=$(command -v /usr/bin/docker || command -v docker)
tar -C "$root" -c . | "$docker" import - "$image" >/dev/null
echo "$image"
