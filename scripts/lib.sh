# shellcheck shell=bash
# Shared functions for scripts/*.sh. Source it: . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
#   ensure_apt_packages PKG...   install the Debian packages that are missing
#   ensure_venv DIR              venv with the base python3 and `pip install -e '.[test,dev]'`
#   start_private_dockerd DIR    a private dockerd on unix://DIR/docker.sock (background)
#   stop_private_dockerd DIR     stop it again (SIGTERM, then SIGKILL after 20 s)
#   docker_reachable URL         does a Docker engine answer at URL?

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO_ROOT

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

# require_root WHAT: exit with a clear message unless running as root.
require_root() {
	if [ "$(id -u)" -ne 0 ]; then
		die "$1 must run as root: it installs Debian packages with apt-get and starts a private dockerd (try: sudo $1)"
	fi
}

# ensure_apt_packages PKG...: `apt-get update` (once per run) and install only the missing
# packages, without recommends.
_APT_UPDATED=0
ensure_apt_packages() {
	local pkg missing=()
	for pkg in "$@"; do
		if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
			missing+=("$pkg")
		fi
	done
	if [ "${#missing[@]}" -eq 0 ]; then
		return 0
	fi
	require_root "${0##*/}"
	log "installing Debian packages: ${missing[*]}"
	if [ "$_APT_UPDATED" -eq 0 ]; then
		apt-get update -q
		_APT_UPDATED=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# base_python: the base image's python3 (pyenv's, not Debian's /usr/bin/python3), which must
# be >= 3.11. $SNAPAGENTD_PYTHON overrides.
base_python() {
	local candidate
	for candidate in "${SNAPAGENTD_PYTHON:-}" "$(command -v python3 || true)" \
		"${PYENV_ROOT:-$HOME/.pyenv}/shims/python3" /usr/local/bin/python3 /usr/bin/python3; do
		if [ -z "$candidate" ] || [ ! -x "$candidate" ]; then
			continue
		fi
		if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
			printf '%s\n' "$candidate"
			return 0
		fi
	done
	die "no python3 >= 3.11 with the venv module found (set SNAPAGENTD_PYTHON)"
}

# ensure_venv DIR: a venv at DIR (relative to the repo root if not absolute) made with the
# base python3, with the project installed editable with its test and dev extras, at the
# newest versions PyPI has. Skipped when pyproject.toml (and the base python) are unchanged
# since the last install (stamp file DIR/.snapagentd-stamp).
ensure_venv() {
	local venv=$1 python stamp want
	case "$venv" in /*) ;; *) venv="$REPO_ROOT/$venv" ;; esac
	python=$(base_python)
	stamp="$venv/.snapagentd-stamp"
	want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
	if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c 'pass' 2>/dev/null; then
		warn "$venv is broken (its python does not run): recreating it"
		rm -rf "$venv"
	fi
	if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
		"$venv/bin/python" -c 'import snapagentd' 2>/dev/null; then
		log "venv $venv is up to date (pyproject.toml unchanged)"
		return 0
	fi
	if [ ! -x "$venv/bin/python" ]; then
		log "creating venv $venv with $python"
		"$python" -m venv "$venv"
	fi
	log "installing snapagentd[test,dev] into $venv (newest PyPI versions)"
	"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
	"$venv/bin/python" -m pip install -q --disable-pip-version-check \
		--upgrade --upgrade-strategy eager -e "${REPO_ROOT}[test,dev]"
	printf '%s\n' "$want" >"$stamp"
}

# docker_cli: the docker client to use (Debian's when installed, else whatever is on PATH).
docker_cli() {
	if [ -x /usr/bin/docker ]; then
		printf '%s\n' /usr/bin/docker
	else
		command -v docker || true
	fi
}

# docker_reachable URL: true when a Docker engine answers at URL (unix://, tcp://...).
docker_reachable() {
	local url=$1 cli
	[ -n "$url" ] || return 1
	if [[ $url == unix://* ]] && [ ! -S "${url#unix://}" ]; then
		return 1
	fi
	cli=$(docker_cli)
	if [ -n "$cli" ]; then
		DOCKER_CONTEXT='' timeout 10 "$cli" -H "$url" version >/dev/null 2>&1
	elif [[ $url == unix://* ]] && command -v curl >/dev/null; then
		timeout 10 curl -sf --unix-socket "${url#unix://}" http://localhost/_ping >/dev/null 2>&1
	else
		return 1
	fi
}

_dockerd_pid() {
	local pid
	pid=$(cat "$1/docker.pid" 2>/dev/null || true)
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		printf '%s\n' "$pid"
	fi
}

# start_private_dockerd DIR: start dockerd in the background with everything under DIR
# (docker.sock, root/, exec/, docker.pid, dockerd.log) and wait (30 s at most) until it
# answers. Reuses one already running there. Keep DIR short: Unix socket paths are limited
# to 107 bytes and containerd puts its sockets under DIR/exec.
start_private_dockerd() {
	local dir=$1 sock dockerd pid deadline
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	sock="$dir/docker.sock"
	if [ "${#dir}" -gt 68 ]; then # 107 - len("/exec/containerd/containerd.sock.ttrpc") - slack
		die "$dir is too long for dockerd's Unix sockets (at most 68 characters): use a shorter directory"
	fi
	if [ -n "$(_dockerd_pid "$dir")" ] && docker_reachable "unix://$sock"; then
		log "reusing the private dockerd already running on unix://$sock"
		return 0
	fi
	dockerd=$(command -v dockerd || true)
	[ -n "$dockerd" ] || dockerd=/usr/sbin/dockerd
	[ -x "$dockerd" ] || die "dockerd not installed (Debian package docker.io)"
	rm -f "$sock"
	log "starting a private dockerd on unix://$sock (log: $dir/dockerd.log)"
	"$dockerd" --host "unix://$sock" --data-root "$dir/root" --exec-root "$dir/exec" \
		--pidfile "$dir/docker.pid" --iptables=false --bridge=none \
		</dev/null >>"$dir/dockerd.log" 2>&1 &
	pid=$!
	deadline=$((SECONDS + 30))
	until docker_reachable "unix://$sock"; do
		if ! kill -0 "$pid" 2>/dev/null; then
			tail -n 30 "$dir/dockerd.log" >&2 || true
			die "dockerd exited while starting (log: $dir/dockerd.log)"
		fi
		if [ "$SECONDS" -ge "$deadline" ]; then
			tail -n 30 "$dir/dockerd.log" >&2 || true
			kill -TERM "$pid" 2>/dev/null || true
			die "dockerd did not answer on unix://$sock within 30 s (log: $dir/dockerd.log)"
		fi
		sleep 0.1 # polling interval; readiness is decided by `docker version` above
	done
}

# stop_private_dockerd DIR: stop the dockerd started by start_private_dockerd DIR.
stop_private_dockerd() {
	local dir=$1 pid deadline
	pid=$(_dockerd_pid "$dir")
	[ -n "$pid" ] || return 0
	log "stopping the private dockerd (pid $pid)"
	kill -TERM "$pid" 2>/dev/null || return 0
	deadline=$((SECONDS + 20))
	while kill -0 "$pid" 2>/dev/null; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			warn "dockerd (pid $pid) did not stop within 20 s: killing it"
			kill -KILL "$pid" 2>/dev/null || true
			break
		fi
		sleep 0.1
	done
}
