#!/usr/bin/env bash
# Builds mask-fields.wasm from app.py against fmhost's WIT (world `transform`).
# Needs: pip install componentize-py   (0.25 was used here)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/mask-fields.wasm}"
cd "$here"
componentize-py --wit-path ../../wit --world transform componentize app -o "$out"
echo "built $out"
