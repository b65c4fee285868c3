#!/usr/bin/env bash
# Run snapagentd on this machine, in the foreground (Ctrl-C stops it).
#
# Uses the Docker engine at $DOCKER_HOST or unix:///run/docker.sock when one answers there;
# otherwise installs Debian's docker.io if needed and starts a private dockerd under
# .run/docker, which is stopped again when the agent exits. Writes .run/snapagentd.toml
# (unless it exists: delete it to regenerate) and runs .venv/bin/snapagentd with it.
# Extra arguments go to snapagentd.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

RUN_DIR="$REPO_ROOT/.run"
CONFIG="$RUN_DIR/snapagentd.toml"
API_SOCKET="$RUN_DIR/snapagentd.sock"
mkdir -p "$RUN_DIR"

ensure_venv .venv

docker_url=""
for candidate in "${DOCKER_HOST:-}" unix:///run/docker.sock; do
	if [ -n "$candidate" ] && docker_reachable "$candidate"; then
		docker_url=$candidate
		log "using the Docker engine at $docker_url"
		break
	fi
done

private_dir=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
	if [ -n "$private_dir" ]; then
		stop_private_dockerd "$private_dir"
	fi
}
trap cleanup EXIT

if [ -z "$docker_url" ]; then
	require_root "scripts/run-agent.sh"
	ensure_apt_packages docker.io
	private_dir="$RUN_DIR/docker"
	if [ "${#private_dir}" -gt 68 ]; then # too long for containerd's socket paths
		private_dir="/tmp/sa-run-$(printf '%s' "$REPO_ROOT" | cksum | cut -d' ' -f1)"
		warn "$RUN_DIR is too deep for dockerd's Unix sockets: its private dockerd lives in $private_dir"
	fi
	start_private_dockerd "$private_dir"
	docker_url="unix://$private_dir/docker.sock"
fi

if [ ! -f "$CONFIG" ]; then
	log "writing $CONFIG"
	cat >"$CONFIG" <<EOF
# Written by scripts/run-agent.sh; delete this file to have it written again.
# The policy (ttl, max_count, max_size, interval, min_age) is left at its defaults;
# set it in a [policy] table.

[api]
socket = "$API_SOCKET"
socket_mode = "0660"

[docker]
url = "$docker_url"

[journal]
path = "$RUN_DIR/journal.jsonl"
EOF
else
	log "using the existing $CONFIG (delete it to have it written again)"
	if ! grep -qF "url = \"$docker_url\"" "$CONFIG"; then
		warn "$CONFIG does not point at $docker_url: check its [docker] url"
	fi
fi

cat <<EOF

snapagentd is starting in the foreground (Ctrl-C stops it).
  config:  ${CONFIG#"$REPO_ROOT"/}
  docker:  $docker_url
  API:     ${API_SOCKET#"$REPO_ROOT"/}
From another terminal, in $REPO_ROOT:
  .venv/bin/snapagentctl --socket .run/snapagentd.sock status
  .venv/bin/snapagentctl --socket .run/snapagentd.sock register PROJECT WORK-ITEM IMAGE
  .venv/bin/snapagentctl --socket .run/snapagentd.sock lookup PROJECT WORK-ITEM
  .venv/bin/snapagentctl --socket .run/snapagentd.sock evict --dry-run
  (docker -H $docker_url images   shows the engine's images)

EOF

# Not exec: the EXIT trap must stop a private dockerd after the agent is gone. Run in the
# foreground so that Ctrl-C reaches the agent too.
status=0
.venv/bin/snapagentd --config "$CONFIG" "$@" || status=$?
exit "$status"
