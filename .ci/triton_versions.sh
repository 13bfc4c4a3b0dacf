#!/usr/bin/env bash
# CI: the Triton of the GPU machine (3.6), installed beside the current one
# for the ahead-of-time compile test of tests/test_triton_kernels.py (the
# kernels compiled for sm_90 without a GPU, with each Triton). Prints the
# folder that holds it, for the test's environment variable:
#
#   export FUSED_ADAMW_TRITON_AOT_PATHS="$(bash .ci/triton_versions.sh)"
#
# Only the triton package (--no-deps): the test puts the folder first on
# PYTHONPATH of a subprocess, which imports it with the installed torch and
# fused_adamw; nothing else changes. Cost: a 188 MB wheel, 642 MB unpacked,
# about 4 s from a local wheel cache. An existing install of the right
# version is reused. Progress goes to stderr; stdout is the folder only.
set -euo pipefail

version="${FUSED_ADAMW_TRITON_AOT_VERSION:-3.6.0}"
dest="${1:-${TMPDIR:-/tmp}/fused_adamw_triton-$version}"

have() {
  PYTHONPATH="$dest" python3 - "$dest" "$version" <<'PY' 2>/dev/null
import os, sys
import triton
dest, version = sys.argv[1:]
ok = triton.__version__ == version and os.path.realpath(triton.__file__).startswith(os.path.realpath(dest) + os.sep)
sys.exit(0 if ok else 1)
PY
}

if ! have; then
  start=$SECONDS
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --upgrade --target "$dest" \
    "triton==$version" >&2
  have || { echo "triton_versions.sh: triton $version did not import from $dest" >&2; exit 1; }
  echo "triton_versions.sh: triton $version in $dest ($(du -sh "$dest" | cut -f1), $((SECONDS - start)) s)" >&2
fi
echo "$dest"
