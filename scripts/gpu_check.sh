#!/usr/bin/env bash
# The accelerator check: the gpu-marked tests, then training speed and accuracy of both models
# (scripts/gpu_bench.py) as a markdown table, with every figure in a JSON file. About 5 minutes
# on one GPU; needs no TensorFlow. On CPU, --quick runs the same on synthetic signs.
#
#   scripts/gpu_check.sh [DATA] [--quick] [--json FILE] [--no-torch] [--no-tests]
#
# DATA is a GTSRB folder or a `cnn-jax pack` file (one file travels to a GPU machine easily);
# without it the built-in synthetic signs are used. PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
args=() tests=1 json=gpu_check.json
while [ $# -gt 0 ]; do
  case $1 in
    --no-tests) tests=0 ;;
    --json) json=$2; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c 'import jax; print("jax", jax.__version__, "devices:", jax.devices())'
status=0
if [ "$tests" = 1 ]; then
  "$python" -m pytest -m gpu -rs -q -p no:cacheprovider tests || status=$?
fi
"$python" scripts/gpu_bench.py "${args[@]}" --json "$json" || status=$?
echo "figures: $json"
exit "$status"
