#!/usr/bin/env bash
# Every GPU mode of opd's benchmarks in one prepared run, for the day a GPU is lent (about 6 minutes
# on one H100/H200; each benchmark has its own time limit so one that hangs cannot eat the rest):
#
#   bash bench/device.sh            # GPU: writes bench/results/gpu-*.json, the device name inside
#   bash bench/device.sh --smoke    # CPU: every benchmark's smoke mode on tiny models (CI runs this)
#
# Each benchmark writes its JSON as soon as it finishes, so a run cut short keeps what it measured.
# Python packages the GPU machine lacks (fastapi, uvicorn, pydantic, vllm, ...) can travel as
# wheels in .whl/ (see BENCHMARKS.md); they are installed into /tmp/opd-site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/opd-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/opd-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
RESULTS=${OPD_BENCH_RESULTS:-bench/results}
mkdir -p "$RESULTS"
failed=()

run() {  # run NAME SECONDS MODULE ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$PY" -m "$@" || failed+=("$name (exit $?)")
    echo "== $name took $((SECONDS - start)) s"
}

if [ "${1:-}" = "--smoke" ]; then
    run learner_scale 300 bench.learner_scale --smoke --out "$RESULTS/smoke-learner_scale.json"
    run services 600 bench.gpu_bench --smoke --out "$RESULTS/smoke-services.json"
    run pipeline 600 bench.pipeline --smoke --out "$RESULTS/smoke-pipeline.json"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
    run learner_scale 120 bench.learner_scale --gpu --out "$RESULTS/gpu-learner_scale.json"
    if "$PY" -c "import vllm" 2>/dev/null; then
        run services 240 bench.gpu_bench --preset qwen2.5 --repeats 3 --out "$RESULTS/gpu-services.json"
        run pipeline 150 bench.pipeline --gpu --out "$RESULTS/gpu-pipeline.json"
    else
        failed+=("services and pipeline: vllm is not importable (carry its wheel in .whl/)")
    fi
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all benchmarks ran; results in $RESULTS"
