#!/usr/bin/env bash
# Generate the Go and TypeScript clients' code from protos/ into sdk/go/cloudburst/v1 and
# sdk/typescript/src/gen with buf and the pinned plugins. The output is committed; CI runs this
# again and fails when `git diff` shows a difference (make clients-check).
set -euo pipefail
cd "$(dirname "$0")/.."

buf=tools/buf/node_modules/.bin/buf
[[ -x "$buf" ]] || npm ci --prefix tools/buf --no-audit --no-fund --loglevel=error
[[ -x sdk/typescript/node_modules/.bin/protoc-gen-es ]] ||
    npm ci --prefix sdk/typescript --no-audit --no-fund --loglevel=error
go_tools="$(tools/codegen/build.sh | tail -n 1)"
export PATH="$go_tools:$PWD/sdk/typescript/node_modules/.bin:$PATH"

rm -rf sdk/go/cloudburst/v1 sdk/typescript/src/gen
"$buf" generate --template protos/buf.gen.yaml
"$buf" generate --template protos/buf.gen.googleapis.yaml
echo "generated the Go and TypeScript clients from protos/"
