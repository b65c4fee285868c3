#!/usr/bin/env bash
# The TypeScript side of the test suite, against real agents on one private dockerd:
#   1. clients/node: `npm test` (src/openapi.ts current with docs/openapi.json, build, then
#      node:test: the contracts/ examples replayed, the naming table, the error classes, the
#      transport against real agents and stand-ins);
#   2. examples/router: build, then its end-to-end test (test/e2e.sh).
# Installs what it needs: Debian's docker.io and busybox-static, Node.js and npm (Debian's, if
# `node` is missing), the Node packages (`npm ci`, only when package-lock.json changed since the
# last install), and the venv the agent runs from (.venv). Must run as root (dockerd).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

require_root "scripts/test-clients.sh"
ensure_apt_packages docker.io busybox-static
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
	ensure_apt_packages nodejs npm
fi
log "node $(node --version), npm $(npm --version)"

# The agent the tests start: $SNAPAGENTD_PYTHON, else the dev venv.
if [ -z "${SNAPAGENTD_PYTHON:-}" ]; then
	ensure_venv .venv
	export SNAPAGENTD_PYTHON="$REPO_ROOT/.venv/bin/python"
fi

# npm_ci_if_needed DIR: `npm ci` unless DIR/node_modules was installed from this very lockfile.
npm_ci_if_needed() {
	local dir=$1 stamp want
	stamp="$dir/node_modules/.snapagentd-stamp"
	want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1) $(node --version)"
	if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
		log "$dir/node_modules is up to date"
		return 0
	fi
	log "npm ci in $dir (from the npm registry)"
	(cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
	printf '%s\n' "$want" >"$stamp"
}

engine=$(mktemp -d /tmp/saclients-XXXXXX)
cleanup() {
	stop_private_dockerd "$engine"
	rm -rf "$engine"
}
trap cleanup EXIT
start_private_dockerd "$engine"
export SNAPAGENTD_TEST_DOCKER_HOST="unix://$engine/docker.sock"

failed=()
step() { # step NAME DIR COMMAND...: run it in DIR, remember a failure, go on
	local name=$1 dir=$2
	shift 2
	log "$name"
	if (cd "$dir" && "$@"); then
		log "$name: passed"
	else
		failed+=("$name")
		log "$name: FAILED"
	fi
}

npm_ci_if_needed clients/node
step "clients/node: npm test" clients/node npm test --silent
npm_ci_if_needed examples/router
step "clients/node: build (for the example)" clients/node npm run build --silent
step "examples/router: build" examples/router npm run build --silent
step "examples/router: end to end" examples/router npm test --silent

if [ "${#failed[@]}" -gt 0 ]; then
	log "FAILED: ${failed[*]}"
	exit 1
fi
log "client tests: all passed"
