#!/usr/bin/env bash
# Build the AWS provider pinned in go.mod into a per-user cache outside the repository, laid
# out as an OpenTofu filesystem mirror, and print the mirror directory as the last line of
# stdout. Progress goes to stderr. Optional (make terraform-e2e), never run by CI: a cold build
# takes ~25 minutes on two idle cores, ~9.5 GB of memory at link time, and leaves ~10 GB of Go
# caches.
#
# Mirror location (keyed by the provider's module version):
#   ${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}/terraform-provider-aws-<version>/mirror
set -euo pipefail

# The version the mirror advertises: the release this pseudo-version precedes.
PROVIDER_VERSION=6.48.0

log() { printf 'terraform-provider-aws-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
cd "$script_dir"

module_version="$(awk '$1 == "github.com/hashicorp/terraform-provider-aws" { print $2; exit }
    $1 == "require" && $2 == "github.com/hashicorp/terraform-provider-aws" { print $3; exit }' go.mod)"
[[ -n "$module_version" ]] || die "github.com/hashicorp/terraform-provider-aws not required in go.mod"

cache_root="${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}"
dest_dir="$cache_root/terraform-provider-aws-$module_version"
mirror="$dest_dir/mirror"
platform="$(go env GOOS)_$(go env GOARCH)"
package_dir="$mirror/registry.opentofu.org/hashicorp/aws/$PROVIDER_VERSION/$platform"
binary="$package_dir/terraform-provider-aws_v$PROVIDER_VERSION"

if [[ -x "$binary" ]]; then
    log "using cached AWS provider $PROVIDER_VERSION ($module_version)"
    printf '%s\n' "$mirror"
    exit 0
fi

command -v go >/dev/null 2>&1 || die "go not found in PATH"
mkdir -p "$package_dir"
tmp_dir="$(mktemp -d "$dest_dir/.build.XXXXXX")"
trap 'rm -rf -- "$tmp_dir"' EXIT

log "building the AWS provider $module_version (cold: ~25 minutes, ~9.5 GB of memory at link)"
start=$SECONDS
CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' \
    -o "$tmp_dir/terraform-provider-aws" github.com/hashicorp/terraform-provider-aws >&2
mv -f -- "$tmp_dir/terraform-provider-aws" "$binary"
# The same files under the registry host Terraform uses, for either CLI.
legacy_dir="$mirror/registry.terraform.io/hashicorp/aws/$PROVIDER_VERSION/$platform"
mkdir -p "$legacy_dir"
ln -f "$binary" "$legacy_dir/terraform-provider-aws_v$PROVIDER_VERSION"
log "built the AWS provider in $((SECONDS - start))s"

printf '%s\n' "$mirror"
