#!/usr/bin/env bash
# Build the Debian package from this checkout into dist/ and check it with lintian:
#   ./scripts/build-deb.sh            -> dist/snapagentd_<version>_all.deb
# The build runs in a scratch copy of the files git tracks (plus new, not ignored ones), so
# local venvs and build outputs never leak into the package. Installs the Build-Depends
# (apt-get build-dep) and lintian when they are missing. DEB_BUILD_OPTIONS=nocheck skips the
# tests that dh_auto_test runs. Fails when lintian reports an error or a warning that
# debian/snapagentd.lintian-overrides does not explain.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# Debian's python3 must build it: pyenv's shims earlier in root's PATH would shadow it.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

ensure_apt_packages dpkg-dev lintian
if ! dpkg-checkbuilddeps >/dev/null 2>&1; then
	require_root "scripts/build-deb.sh"
	log "installing the Build-Depends of debian/control"
	if [ "$_APT_UPDATED" -eq 0 ]; then
		apt-get update -q
		_APT_UPDATED=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -q --no-install-recommends ./
fi

version=$(dpkg-parsechangelog -S Version)
scratch=$(mktemp -d /tmp/snapagentd-build.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
source_dir="$scratch/snapagentd-$version"
mkdir -p "$source_dir"
if [ -d .git ]; then
	git ls-files -z --cached --others --exclude-standard |
		tar --null -T - -cf - | tar -C "$source_dir" -xf -
else
	tar --exclude=./.venv --exclude=./.run --exclude=./dist --exclude=./build -cf - . |
		tar -C "$source_dir" -xf -
fi

log "dpkg-buildpackage -us -uc -b (in $source_dir)"
(cd "$source_dir" && dpkg-buildpackage -us -uc -b)

mkdir -p dist
changes="$scratch/snapagentd_${version}_$(dpkg --print-architecture).changes"
deb="snapagentd_${version}_all.deb"
cp "$scratch/$deb" "$scratch"/*.buildinfo "$changes" dist/
log "built dist/$deb"

log "lintian dist/$deb"
lintian --fail-on error,warning --display-info --pedantic --tag-display-limit 0 "dist/$deb"
log "lintian: no errors, no unexplained warnings"
