#!/usr/bin/env bash
# Every GPU mode of opd's benchmarks in one prepared run, for the day a GPU is lent (each benchmark
# has its own time limit so one that hangs cannot eat the rest; all five parts can take up to 25 minutes,
# so name a part per call where one call may run 10):
#
#   bash bench/device.sh                 # GPU: writes bench/results/gpu-*.json, the device name inside
#   bash bench/device.sh toy scale       # GPU: only these (scale, toy, gkd, services, pipeline), in that order
#   bash bench/device.sh --smoke         # CPU: every benchmark's smoke mode on tiny models (CI runs this)
#
# Each benchmark writes its JSON as soon as it finishes, so a run cut short keeps what it measured.
# Python packages the GPU machine lacks (fastapi, uvicorn, pydantic, trl, datasets, vllm, ...) can
# travel as wheels in .whl/ (see BENCHMARKS.md); they are installed into /tmp/opd-site first. The toy
# comparison reuses runs/toy (the CPU runs' models; carry it) and trains them first where it is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# (not for --smoke: that runs in this project's own environment, and the wheels are the device's)
if [ "${1:-}" != "--smoke" ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/opd-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/opd-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
RESULTS=${OPD_BENCH_RESULTS:-bench/results}
mkdir -p "$RESULTS"
failed=()
selected=()

run() {  # run NAME SECONDS MODULE ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS rc=0
    timeout "$limit" "$PY" -m "$@" || rc=$?
    [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
    echo "== $name took $((SECONDS - start)) s"
    return $rc
}

wanted() {  # wanted NAME: no names given, or NAME among them
    [ ${#selected[@]} -eq 0 ] || [[ " ${selected[*]} " == *" $1 "* ]]
}

keep_logs() {  # keep_logs DIR NAME: the service logs of the runs under DIR into $RESULTS/NAME-logs
    local log  # (a failed run's only trace: nothing but $RESULTS comes back from a lent machine)
    while IFS= read -r log; do
        mkdir -p "$RESULTS/$2-logs"
        tail -c 1000000 "$log" >"$RESULTS/$2-logs/$(echo "${log#"$1"/}" | tr / _)"
    done < <(find "$1" -path '*/logs/*.log' 2>/dev/null)
}

toy() {  # the toy task at ppo_steps 1, opd top-k vs TRL GKD on the GPU, one run per seed (issue 13)
    local seed
    # first, whether the learner's pushes reach its torch samplers by CUDA IPC (else they go over HTTP)
    run push_shared 60 bench.push_check --shared cuda --out "$RESULTS/gpu-push_shared.json"
    for seed in 0 1 2; do
        run "toy seed $seed" 150 bench.toy_distill --device cuda --engine torch --ppo-steps 1 --losses topk \
            --seed "$seed" --out "/tmp/opd-gpu-toy-s$seed" &&
            cp "/tmp/opd-gpu-toy-s$seed/results.json" "$RESULTS/gpu-toy_distill-s$seed.json" ||
            keep_logs "/tmp/opd-gpu-toy-s$seed" "gpu-toy-s$seed"
    done
}

if [ "${1:-}" = "--smoke" ]; then
    run learner_scale 300 bench.learner_scale --smoke --out "$RESULTS/smoke-learner_scale.json"
    run lm_head 60 bench.lm_head --smoke --out "$RESULTS/smoke-lm_head.json"
    run push_shared 120 bench.push_check --shared cpu --out "$RESULTS/smoke-push_shared.json"
    run gkd 300 bench.gkd_scale --smoke --losses topk --out "$RESULTS/smoke-gkd_scale.json"
    run services 600 bench.gpu_bench --smoke --out "$RESULTS/smoke-services.json"
    run pipeline 600 bench.pipeline --smoke --out "$RESULTS/smoke-pipeline.json"
else
    selected=("$@")
    for name in "${selected[@]}"; do
        case $name in scale | toy | gkd | services | pipeline) ;; *) echo "unknown benchmark: $name" >&2; exit 2 ;; esac
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
    "$PY" -c "import fastapi, uvicorn, pydantic" || exit 1  # opd's servers (carried in .whl/)
    # toy and gkd compare with TRL, which needs datasets and through it pyarrow >= 24 (the image's
    # own pyarrow, unread here): find out before their long runs, and skip them if TRL cannot load
    trl=1
    "$PY" -c "import transformers, pyarrow, datasets, trl
print('transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__)" ||
        trl=0
    with_trl() {  # with_trl NAME: NAME is wanted and TRL loads (else it is reported, not run)
        wanted "$1" || return 1
        [ $trl -eq 1 ] || failed+=("$1: TRL does not import (above), not run")
        [ $trl -eq 1 ]
    }
    wanted scale && run lm_head 30 bench.lm_head --gpu --out "$RESULTS/gpu-lm_head.json"
    wanted scale && run learner_scale 120 bench.learner_scale --gpu --out "$RESULTS/gpu-learner_scale.json"
    with_trl toy && toy
    # time per step at Qwen2.5 shapes, opd sampled and top-k vs TRL GKD (issue 13; builds its models first)
    # (torch engines decode one token per forward: 128 tokens keep a step to seconds; building the
    # models and starting 2 x 2 servers take most of the limit)
    # (GKD runs first, then topk, then sampled; the file is rewritten after each, so a cut run keeps them)
    with_trl gkd && run gkd 400 bench.gkd_scale --device cuda --batch-size 16 --prompt-digits 120 --max-tokens 128 \
        --steps 4 --losses topk sampled --out "$RESULTS/gpu-gkd_scale.json"
    if ! { wanted services || wanted pipeline; }; then
        :
    elif "$PY" -c "import vllm" 2>/dev/null; then
        wanted services && run services 240 bench.gpu_bench --preset qwen2.5 --repeats 3 --out "$RESULTS/gpu-services.json"
        wanted pipeline && run pipeline 150 bench.pipeline --gpu --out "$RESULTS/gpu-pipeline.json"
    else
        failed+=("services and pipeline: vllm is not importable (carry its wheel in .whl/)")
    fi
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all benchmarks ran; results in $RESULTS"
