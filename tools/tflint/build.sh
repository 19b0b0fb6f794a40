#!/usr/bin/env bash
# Build tflint and its AWS ruleset plugin at pinned versions from the Go module proxy into a
# per-user cache outside the repository. Prints two lines on stdout: the tflint binary, then
# the plugin directory to use as TFLINT_PLUGIN_DIR. Progress goes to stderr.
#
# Cache locations (keyed by version):
#   ${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}/tflint-<version>/tflint
#   ${CBGRPC_CACHE_DIR:-...}/tflint-ruleset-aws-<version>/tflint-ruleset-aws
set -euo pipefail

TFLINT_VERSION=0.64.0

log() { printf 'tflint-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
ruleset_version="$(awk '$1 == "github.com/terraform-linters/tflint-ruleset-aws" { print $2; exit }' \
    "$script_dir/ruleset-aws/go.mod")"
[[ -n "$ruleset_version" ]] || die "tflint-ruleset-aws not required in ruleset-aws/go.mod"
ruleset_version="${ruleset_version#v}"

cache_root="${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}"
tflint_dir="$cache_root/tflint-$TFLINT_VERSION"
plugin_dir="$cache_root/tflint-ruleset-aws-$ruleset_version"

# Build into a temporary directory beside the destination, then rename into place.
build() { # dest_dir binary-name command...
    local dest_dir="$1" name="$2" tmp
    shift 2
    mkdir -p "$dest_dir"
    tmp="$(mktemp -d "$dest_dir/.build.XXXXXX")"
    if ! "$@" "$tmp" >&2; then
        rm -rf -- "$tmp"
        die "building $name failed"
    fi
    mv -f -- "$tmp/$name" "$dest_dir/$name"
    rm -rf -- "$tmp"
}

# -s -w: no symbol table and no debug information (DWARF) in the binary. The compiler still
# writes DWARF for every package unless told not to, and the linker then drops it:
# -gcflags=all=-dwarf=false skips that work (a cold build compiles hundreds of packages);
# the code is compiled and optimised exactly as without it.
install_tflint() { GOBIN="$1" CGO_ENABLED=0 go install -trimpath -gcflags=all=-dwarf=false \
    -ldflags '-s -w' "github.com/terraform-linters/tflint@v$TFLINT_VERSION"; }
build_ruleset() { (cd "$script_dir/ruleset-aws" && CGO_ENABLED=0 go build -trimpath \
    -gcflags=all=-dwarf=false -ldflags '-s -w' \
    -o "$1/tflint-ruleset-aws" github.com/terraform-linters/tflint-ruleset-aws); }

if [[ -x "$tflint_dir/tflint" ]] && "$tflint_dir/tflint" --version >/dev/null 2>&1; then
    log "using cached tflint $TFLINT_VERSION"
else
    command -v go >/dev/null 2>&1 || die "go not found in PATH"
    log "building tflint $TFLINT_VERSION (a cold build takes a few minutes)"
    build "$tflint_dir" tflint install_tflint
fi

if [[ -x "$plugin_dir/tflint-ruleset-aws" ]]; then
    log "using cached tflint-ruleset-aws $ruleset_version"
else
    command -v go >/dev/null 2>&1 || die "go not found in PATH"
    log "building tflint-ruleset-aws $ruleset_version (a cold build takes a few minutes)"
    build "$plugin_dir" tflint-ruleset-aws build_ruleset
fi

printf '%s\n%s\n' "$tflint_dir/tflint" "$plugin_dir"
