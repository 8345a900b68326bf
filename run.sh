#!/usr/bin/env bash
# jaxlm's two set-up-and-run commands (see README.md):
#   bash run.sh           create .venv if needed, train configs/tiny.yaml on CPU, print samples
#   bash run.sh test      create .venv if needed, run the test suite (fast tests, 2 workers)
# Extra arguments go to the command: `bash run.sh train.steps=100`, `bash run.sh test -k config`.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "run.sh: jaxlm needs Python >= 3.10; set PYTHON=/path/to/python3.11 and retry." >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "run.sh: creating .venv with $("$PYTHON" --version)" >&2
  "$PYTHON" -m venv .venv
fi
mode="${1:-train}"
# The main job needs only jaxlm; the tests also need pytest, transformers and a CPU torch (the
# Hugging Face parity tests) and libtpu (TPU compile tests). constraints.txt pins every package
# to the version CI passed with (.ci/freeze writes it). Reinstall only when either file changed.
extra=""
[ "$mode" = test ] && extra="[test]"
stamp=".venv/.installed$extra-$(cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "run.sh: installing jaxlm$extra and its dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".$extra"
  rm -f ".venv/.installed$extra"-*
  touch "$stamp"
fi

# The quick start runs on the CPU. libtpu (installed for the TPU compile tests) would otherwise
# probe for a TPU at every start; set JAX_PLATFORMS= (empty) to use an accelerator instead.
export JAX_PLATFORMS="${JAX_PLATFORMS-cpu}"

case "$mode" in
  test)
    shift
    exec .venv/bin/python -m pytest -n 2 "$@"
    ;;
  train)
    [ $# -gt 0 ] && shift
    exec .venv/bin/jaxlm train --config configs/tiny.yaml --workdir runs/tiny "$@"
    ;;
  *)
    exec .venv/bin/jaxlm train --config configs/tiny.yaml --workdir runs/tiny "$@"
    ;;
esac
