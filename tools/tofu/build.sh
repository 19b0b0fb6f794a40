#!/usr/bin/env bash
# Build the OpenTofu CLI pinned in go.mod into a per-user cache directory
# outside the repository, and print the binary's path as the last line of
# stdout. All progress output goes to stderr.
#
# Cache location (keyed by OpenTofu version):
#   ${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}/tofu-<version>/tofu
#
# The build is skipped when that binary already exists and `tofu version`
# runs. Usage: tools/tofu/build.sh   (from any directory)
set -euo pipefail

log() { printf 'tofu-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
cd "$script_dir"

module_version="$(awk '$1 == "github.com/opentofu/opentofu" { print $2; exit }' go.mod)"
[[ -n "$module_version" ]] || die "github.com/opentofu/opentofu not required in go.mod"
version="${module_version#v}"

cache_root="${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}"
dest_dir="$cache_root/tofu-$version"
dest="$dest_dir/tofu"

if [[ -x "$dest" ]] && "$dest" version >/dev/null 2>&1; then
    log "using cached OpenTofu $version"
    printf '%s\n' "$dest"
    exit 0
fi

command -v go >/dev/null 2>&1 || die "go not found in PATH"

mkdir -p "$dest_dir"
# Build next to the destination and rename into place, so concurrent or
# interrupted runs never leave a partial binary at $dest.
tmp_dir="$(mktemp -d "$dest_dir/.build.XXXXXX")"
trap 'rm -rf -- "$tmp_dir"' EXIT

log "building OpenTofu $version into $dest_dir (a cold build compiles for about 11 CPU-minutes: 6 or more on two idle cores)"
start=$SECONDS
# -s -w: no symbol table and no debug information (DWARF) in the binary. The compiler still
# writes DWARF for every package unless told not to, and the linker then drops it:
# -gcflags=all=-dwarf=false skips that work (a cold build compiles hundreds of packages);
# the code is compiled and optimised exactly as without it.
# `dev=no` drops the "-dev" suffix, as OpenTofu's release builds do.
CGO_ENABLED=0 go build -trimpath -gcflags=all=-dwarf=false \
    -ldflags '-s -w -X github.com/opentofu/opentofu/version.dev=no' \
    -o "$tmp_dir/tofu" github.com/opentofu/opentofu/cmd/tofu >&2
"$tmp_dir/tofu" version >/dev/null 2>&1 || die "built binary does not run"
mv -f -- "$tmp_dir/tofu" "$dest"
log "built OpenTofu $version in $((SECONDS - start))s"

printf '%s\n' "$dest"
