#!/usr/bin/env bash
# Builds crm-contact.wasm from app.py against fmhost's WIT (world `connector`).
# Needs: pip install componentize-py==0.25.1
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/crm-contact.wasm}"
cd "$here"
componentize-py --wit-path ../../wit --world connector componentize app -o "$out"
echo "built $out"
