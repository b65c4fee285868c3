#!/usr/bin/env bash
# Run the whole test suite, against real (private) Docker engines:
#   1. ruff;
#   2. the unit and integration tests on .venv (base python3 + the newest PyPI versions);
#   3. the same tests on Debian 12's /usr/bin/python3 with Debian's packages (aiohttp 3.8,
#      docker 5.0.3, sentry-sdk 1.9, sdnotify 0.3), the versions the .deb runs on;
#   4. the TypeScript client's tests and the router example end to end (test-clients.sh),
#      and a smoke run of the benchmarks (bench/, tiny sizes, no verdicts);
#   5. the Debian package: scripts/build-deb.sh (dpkg-buildpackage, then lintian);
#   6. the end-to-end test (tests/e2e): that .deb installed with apt under a real systemd
#      booted in a container of a private dockerd.
# Installs what it needs (Debian's docker.io, debootstrap and python3-* packages, the venv,
# the Build-Depends). Must run as root: the tests start a private dockerd.
# Extra arguments go to the pytest runs of steps 2 and 3, e.g. scripts/test.sh -x -k evict;
# SNAPAGENTD_SKIP_PACKAGE=1 skips steps 5 and 6 (never set in CI).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

require_root "scripts/test.sh"

DEBIAN_PYTHON_PACKAGES=(
	python3-aiohttp python3-docker python3-sdnotify python3-sentry-sdk
	python3-pytest python3-pytest-aiohttp python3-pytest-timeout python3-tomli python3-hypothesis
	python3-prometheus-client
)
ensure_apt_packages docker.io debootstrap dpkg-dev busybox-static "${DEBIAN_PYTHON_PACKAGES[@]}"
ensure_venv .venv

command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] ||
	die "dockerd is missing although docker.io is installed"

VERSIONS_PY='
import sys
from importlib.metadata import PackageNotFoundError, version
names = ["aiohttp", "docker", "sdnotify", "sentry-sdk", "prometheus-client", "pytest",
         "pytest-aiohttp", "pytest-asyncio", "pytest-timeout", "requests", "urllib3", "ruff"]
found = []
for name in names:
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print(f"    python {sys.version.split()[0]} ({sys.executable}): " + ", ".join(found))
'

failed=()

run_step() { # run_step NAME COMMAND...: run it, remember a failure, go on
	local name=$1
	shift
	log "$name"
	if "$@"; then
		log "$name: passed"
	else
		local status=$?
		log "$name: FAILED (exit status $status)"
		failed+=("$name (exit $status)")
	fi
}

log "dockerd: $(dockerd --version 2>/dev/null || /usr/sbin/dockerd --version)"

run_step "ruff check snapagentd tests bench" .venv/bin/ruff check snapagentd tests bench

log "pass 1/2 versions (newest from PyPI):"
.venv/bin/python -c "$VERSIONS_PY"
run_step "pytest pass 1/2: .venv, newest PyPI versions" \
	.venv/bin/python -m pytest tests --ignore=tests/e2e "$@"

log "pass 2/2 versions (Debian 12 packages):"
PYTHONPATH="$REPO_ROOT" /usr/bin/python3 -c "$VERSIONS_PY"
run_step "pytest pass 2/2: /usr/bin/python3, Debian 12 versions" \
	env PYTHONPATH="$REPO_ROOT" /usr/bin/python3 -m pytest tests --ignore=tests/e2e -p no:cacheprovider "$@"

run_step "TypeScript client and router example (scripts/test-clients.sh)" ./scripts/test-clients.sh

# The benchmarks at tiny sizes, without verdicts: keeps bench/ from rotting (timings never
# decide a test; the full run is `python -m bench`, see docs/benchmarks.md).
run_step "bench smoke run (python -m bench --smoke)" .venv/bin/python -m bench --smoke

if [ "${SNAPAGENTD_SKIP_PACKAGE:-0}" = 1 ]; then
	log "SNAPAGENTD_SKIP_PACKAGE=1: not building the .deb, not running tests/e2e"
else
	deb="dist/snapagentd_$(dpkg-parsechangelog -S Version)_all.deb"
	rm -f "$deb" # never test a stale package
	run_step "build the Debian package and run lintian" ./scripts/build-deb.sh
	if [ -f "$deb" ]; then
		run_step "end-to-end: $deb under a real systemd" \
			env SNAPAGENTD_DEB="$REPO_ROOT/$deb" .venv/bin/python -m pytest tests/e2e \
			-rA --durations=0
	fi
fi

if [ "${#failed[@]}" -gt 0 ]; then
	log "FAILED steps:"
	printf '    %s\n' "${failed[@]}" >&2
	exit 1
fi
log "all steps passed"
