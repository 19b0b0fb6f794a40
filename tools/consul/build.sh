#!/usr/bin/env bash
# Build the HashiCorp Consul binary pinned in go.mod into a per-user cache
# directory outside the repository, and print the binary's path as the last
# line of stdout. All progress output goes to stderr.
#
# Cache location (keyed by Consul version):
#   ${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}/consul-<version>/consul
#
# The build is skipped when that binary already exists and `consul version`
# runs. Usage: tools/consul/build.sh   (from any directory)
set -euo pipefail

log() { printf 'consul-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
cd "$script_dir"

# Read the pinned version from go.mod (both the block and the one-line
# `require` forms).
module_version="$(awk '
    $1 == "github.com/hashicorp/consul" { print $2; exit }
    $1 == "require" && $2 == "github.com/hashicorp/consul" { print $3; exit }
' go.mod)"
[[ -n "$module_version" ]] || die "github.com/hashicorp/consul not required in go.mod"
version="${module_version#v}"

cache_root="${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}"
dest_dir="$cache_root/consul-$version"
dest="$dest_dir/consul"

if [[ -x "$dest" ]] && "$dest" version >/dev/null 2>&1; then
    log "using cached Consul $version"
    printf '%s\n' "$dest"
    exit 0
fi

command -v go >/dev/null 2>&1 || die "go not found in PATH"

mkdir -p "$dest_dir"
# Build into a private temporary directory next to the destination, then
# rename into place, so concurrent or interrupted runs never leave a partial
# binary at $dest.
tmp_dir="$(mktemp -d "$dest_dir/.build.XXXXXX")"
trap 'rm -rf -- "$tmp_dir"' EXIT

log "building Consul $version into $dest_dir (a cold build can take 10-25 minutes)"
start=$SECONDS
# -s -w: no symbol table and no debug information (DWARF) in the binary. The compiler still
# writes DWARF for every package unless told not to, and the linker then drops it:
# -gcflags=all=-dwarf=false skips that work (a cold build compiles hundreds of packages);
# the code is compiled and optimised exactly as without it.
CGO_ENABLED=0 go build -trimpath -gcflags=all=-dwarf=false -ldflags '-s -w' \
    -o "$tmp_dir/consul" github.com/hashicorp/consul >&2
"$tmp_dir/consul" version >/dev/null 2>&1 || die "built binary does not run"
mv -f -- "$tmp_dir/consul" "$dest"
log "built Consul $version in $((SECONDS - start))s"

printf '%s\n' "$dest"
