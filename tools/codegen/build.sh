#!/usr/bin/env bash
# Build the Go tools pinned in go.mod (protoc-gen-go, protoc-gen-go-grpc, grpcurl) into a cache
# directory outside the repository, keyed by a hash of go.mod and go.sum, and print that
# directory as the last line of stdout. Progress goes to stderr. Go's own module and build
# caches make a rebuild cheap; a cold one downloads from the Go module proxy (about a minute).
#
# Cache location:
#   ${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}/codegen-<hash>/
set -euo pipefail

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
cd "$script_dir"
command -v go >/dev/null || { echo "codegen: Go is not installed (go.dev/dl)" >&2; exit 1; }

hash="$(cat go.mod go.sum | sha256sum | cut -c1-16)"
cache_root="${CBGRPC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudburst-grpc}"
dest="$cache_root/codegen-$hash"
if [[ ! -x "$dest/grpcurl" || ! -x "$dest/protoc-gen-go" || ! -x "$dest/protoc-gen-go-grpc" ]]; then
    echo "codegen: building the pinned Go tools into $dest" >&2
    mkdir -p "$dest"
    GOBIN="$dest" GOFLAGS=-mod=readonly go install tool
fi
echo "$dest"
