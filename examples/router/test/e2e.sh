#!/usr/bin/env bash
# End-to-end test of the router example: the README's walk-through, with checks, against a
# private dockerd and a real agent. Needs root (dockerd), busybox-static, and `npm run build`.
# Uses the engine in $SNAPAGENTD_TEST_DOCKER_HOST when set (scripts/test-clients.sh), else
# starts and stops one of its own.
set -euo pipefail
example=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo=$(cd "$example/../.." && pwd)
# shellcheck source=scripts/lib.sh
. "$repo/scripts/lib.sh"

work=$(mktemp -d /tmp/sarouter-XXXXXX)
agent_pid=""
own_engine=0
cleanup() {
	if [ -n "$agent_pid" ]; then kill -TERM "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
	[ "$own_engine" = 1 ] && stop_private_dockerd "$work/d"
	rm -rf "$work"
}
trap cleanup EXIT
fail() {
	printf 'FAIL: %s\n' "$*" >&2
	[ -f "$work/agent.log" ] && tail -n 20 "$work/agent.log" >&2
	exit 1
}

if [ -n "${SNAPAGENTD_TEST_DOCKER_HOST:-}" ]; then
	export DOCKER_HOST=$SNAPAGENTD_TEST_DOCKER_HOST
else
	start_private_dockerd "$work/d"
	own_engine=1
	export DOCKER_HOST="unix://$work/d/docker.sock"
fi
python=${SNAPAGENTD_PYTHON:-}
[ -n "$python" ] || { [ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python"; } || python=python3
export SNAPAGENTD_SOCKET="$work/agent.sock"
ctl() { PYTHONPATH="$repo" "$python" -m snapagentd.ctl --socket "$SNAPAGENTD_SOCKET" "$@"; }
router() { node "$example/dist/main.js" "$@"; }

start_agent() {
	PYTHONPATH="$repo" "$python" -m snapagentd --config "$work/agent.toml" >>"$work/agent.log" 2>&1 &
	agent_pid=$!
	local deadline=$((SECONDS + 30))
	until ctl status >/dev/null 2>&1; do # ctl itself retries while the socket is missing
		kill -0 "$agent_pid" 2>/dev/null || fail "the agent exited while starting"
		[ "$SECONDS" -lt "$deadline" ] || fail "the agent did not answer within 30 s"
	done
}

cat >"$work/agent.toml" <<TOML
[api]
socket = "$SNAPAGENTD_SOCKET"
socket_mode = "0600"
[docker]
url = "$DOCKER_HOST"
[journal]
path = "$work/journal.jsonl"
TOML
start_agent
"$example/scripts/make-base-image.sh" router-example-base:latest >/dev/null

project="Proj Snap" item="MNG_652/Worker Snapshot!"
tag=cascade-snapshot-proj-snap-mng-652-worker-snapshot:latest

log "1st run: no snapshot yet, so the worker starts from the base image"
out=$(router "$project" "$item")
printf '%s\n' "$out"
grep -qx 'started from: base (router-example-base:latest)' <<<"$out" || fail "1st run did not start from the base image"
grep -qx "snapshot: $tag (registered)" <<<"$out" || fail "1st run did not register $tag"
[ "$(grep -c '^worked on ' <<<"$out")" = 1 ] || fail "1st run: expected 1 line of history"
found=$(ctl --json lookup "$project" "$item") || fail "snapagentctl lookup failed"
grep -q "\"image\": \"$tag\"" <<<"$found" || fail "the agent does not know $tag"

log "2nd run: the agent has the snapshot, so the worker starts from it (its history grows)"
out=$(router "$project" "$item")
printf '%s\n' "$out"
grep -qx "started from: snapshot ($tag)" <<<"$out" || fail "2nd run did not start from the snapshot"
[ "$(grep -c '^worked on MNG_652/Worker Snapshot! at ' <<<"$out")" = 2 ] || fail "2nd run: expected 2 lines of history"

log "after the snapshot is removed (404 on lookup), the router falls back to the base image"
ctl remove "$project" "$item" >/dev/null || fail "snapagentctl remove failed"
out=$(router "$project" "$item")
grep -qx 'started from: base (router-example-base:latest)' <<<"$out" || fail "no fallback to the base image after a 404"
[ "$(grep -c '^worked on ' <<<"$out")" = 1 ] || fail "3rd run: expected a fresh history"

log "with the agent down, the router carries on without snapshots"
kill -TERM "$agent_pid"
wait "$agent_pid" 2>/dev/null || true
agent_pid=""
out=$(router "$project" "$item" 2>"$work/router.err")
grep -qx 'started from: base (router-example-base:latest)' <<<"$out" || fail "agent down: did not start from the base image"
grep -qx "snapshot: $tag (not registered)" <<<"$out" || fail "agent down: should not claim a registration"
grep -q 'agent unreachable' "$work/router.err" || fail "agent down: no warning"

log "router example: all checks passed"
