#!/usr/bin/env bash
# Builds rename-keys.wasm from plugin.js against fmhost's WIT (world `transform`).
# Needs: npm install -g @bytecodealliance/componentize-js   (0.23 was used here)
# `--disable http fetch-event`: fmhost never grants wasi:http (connectors ask the host instead).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/rename-keys.wasm}"
cd "$here"
componentize-js plugin.js --wit ../../wit --world-name transform --disable http fetch-event -o "$out"
echo "built $out"
