#!/usr/bin/env bash
# Install checkov (pinned in requirements.txt) from PyPI into its own virtual environment in a
# per-user cache outside the repository, and print the checkov executable's path as the last
# line of stdout. Progress goes to stderr.
#
# Cache location (keyed by checkov version):
#   ${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}/checkov-<version>/bin/checkov
set -euo pipefail

log() { printf 'checkov-install: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
version="$(sed -n 's/^checkov==//p' "$script_dir/requirements.txt")"
[[ -n "$version" ]] || die "checkov is not pinned in requirements.txt"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

cache_root="${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}"
dest_dir="$cache_root/checkov-$version"
checkov="$dest_dir/bin/checkov"

if [[ -x "$checkov" ]] && "$checkov" --version >/dev/null 2>&1; then
    log "using cached checkov $version"
    printf '%s\n' "$checkov"
    exit 0
fi

# A virtual environment records its own path, so it is built where it stays; a marker
# file says it is complete.
rm -rf -- "$dest_dir"
log "installing checkov $version into $dest_dir (about a minute)"
"$python" -m venv "$dest_dir"
"$dest_dir/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$script_dir/requirements.txt" >&2 || { rm -rf -- "$dest_dir"; die "pip install failed"; }
"$checkov" --version >/dev/null 2>&1 || { rm -rf -- "$dest_dir"; die "checkov does not run"; }
log "installed checkov $version"
printf '%s\n' "$checkov"
