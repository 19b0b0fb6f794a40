#!/usr/bin/env bash
# Make `cloud-init schema` available without installing cloud-init on this machine:
# Debian's cloud-init package (the version Debian 12 instances run) is downloaded and
# unpacked, not installed (installing it would enable its boot-time services), and its
# Python dependencies go into a virtual environment from PyPI. Prints, as the last line of
# stdout, a wrapper script to run as `cloud-init ...`. Progress goes to stderr.
#
# Cache location (keyed by the package version):
#   ${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}/cloud-init-<version>/cloud-init
set -euo pipefail

log() { printf 'cloud-init-install: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found (a Debian-based machine is needed)"

candidate() { apt-cache policy cloud-init 2>/dev/null | awk '$1 == "Candidate:" { print $2 }'; }
version="$(candidate)"
if [[ -z "$version" || "$version" == "(none)" ]]; then
    log "no cloud-init in the package lists; running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    version="$(candidate)"
fi
[[ -n "$version" && "$version" != "(none)" ]] || die "Debian has no cloud-init package here"

cache_root="${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}"
dest_dir="$cache_root/cloud-init-${version//[^A-Za-z0-9.+-]/_}"
wrapper="$dest_dir/cloud-init"

if [[ -x "$wrapper" ]] && "$wrapper" --version >/dev/null 2>&1; then
    log "using cached cloud-init $version"
    printf '%s\n' "$wrapper"
    exit 0
fi

mkdir -p "$cache_root"
tmp_dir="$(mktemp -d "$cache_root/.cloud-init.XXXXXX")"
trap 'rm -rf -- "$tmp_dir"' EXIT
chmod 0755 "$tmp_dir" # apt's download user must be able to write here

log "downloading Debian's cloud-init $version (unpacked, not installed)"
(cd "$tmp_dir" && apt-get download -qq "cloud-init=$version" >&2) ||
    die "apt-get download cloud-init=$version failed"
dpkg-deb -x "$tmp_dir"/cloud-init_*.deb "$tmp_dir/root"
rm -f "$tmp_dir"/cloud-init_*.deb

log "creating its virtual environment"
"$python" -m venv "$tmp_dir/venv"
"$tmp_dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$script_dir/requirements.txt" >&2

# The wrapper finds its files next to itself, so the directory can be renamed into place.
cat > "$tmp_dir/cloud-init" <<'WRAPPER'
#!/bin/sh
here="$(cd "$(dirname "$0")" && pwd)"
PYTHONPATH="$here/root/usr/lib/python3/dist-packages" exec "$here/venv/bin/python" -c \
    'import sys; from cloudinit.cmd.main import main; sys.argv[0] = "cloud-init"; sys.exit(main())' "$@"
WRAPPER
chmod 0755 "$tmp_dir/cloud-init"
"$tmp_dir/cloud-init" --version >/dev/null 2>&1 || die "the unpacked cloud-init does not run"

rm -rf -- "$dest_dir"
mv -- "$tmp_dir" "$dest_dir"
trap - EXIT
log "cloud-init $version ready"
printf '%s\n' "$wrapper"
