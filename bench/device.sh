#!/usr/bin/env bash
# Every GPU mode of opd's benchmarks in one prepared run, for a lent GPU (each benchmark has its own
# time limit so one that hangs cannot eat the rest; all seven parts can take up to 27 minutes, so name
# the parts per call where one call may run 10; on an H200 push + toy seed 0 + scale took 153 s and
# gkd + two toy seeds 263 s):
#
#   bash bench/device.sh                 # GPU: writes bench/results/gpu-*.json, the device name inside
#   bash bench/device.sh push toy scale  # GPU: only these (scale, push, profile, toy, gkd, services, pipeline), in the order named
#   OPD_TOY_SEEDS="1 2" bash bench/device.sh toy   # the toy comparison's seeds (default 0 1 2)
#   OPD_TOY_STALENESS=1 bash bench/device.sh toy   # opd's pipelined loop (train.max_staleness, default 0)
#   OPD_GKD_LIMIT=300 bash bench/device.sh gkd     # gkd's time limit in seconds (default 400)
#   bash bench/device.sh --smoke         # CPU: every benchmark's smoke mode on tiny models (CI runs this)
#
# Each benchmark writes its JSON as soon as it finishes, so a run cut short keeps what it measured.
# Python packages the GPU machine lacks (fastapi, uvicorn, pydantic, trl, datasets, vllm, ...) can
# travel as wheels in .whl/ (bench/wheels.sh); they are installed into /tmp/opd/site-packages first. The toy
# comparison reuses runs/toy (the CPU runs' models; carry it) and trains them first where it is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# (not for --smoke: that runs in this project's own environment, and the wheels are the device's)
if [ "${1:-}" != "--smoke" ] && compgen -G ".whl/*.whl" >/dev/null; then
    # (a folder named site-packages: datasets hashes its maps with dill, which pickles by value (and
    # fails on pyarrow's) any module whose path has no "site-packages" in it and lies outside sys.prefix)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/opd/site-packages .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/opd/site-packages:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
RESULTS=${OPD_BENCH_RESULTS:-bench/results}
mkdir -p "$RESULTS"
failed=()

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

keep_logs() {  # keep_logs DIR NAME: the service logs of the runs under DIR into $RESULTS/NAME-logs
    local log  # (a failed run's only trace: nothing but $RESULTS comes back from a lent machine)
    while IFS= read -r log; do
        mkdir -p "$RESULTS/$2-logs"
        tail -c 1000000 "$log" >"$RESULTS/$2-logs/$(echo "${log#"$1"/}" | tr / _)"
    done < <(find "$1" -path '*/logs/*.log' 2>/dev/null)
}

toy() {  # the toy task at ppo_steps 1, opd top-k vs TRL GKD on the GPU, one run per seed (issue 13)
    local seed staleness=${OPD_TOY_STALENESS:-0} name
    for seed in ${OPD_TOY_SEEDS:-0 1 2}; do
        name=s$seed
        [ "$staleness" = 0 ] || name=$name-k$staleness
        run "toy $name" 150 bench.toy_distill --device cuda --engine torch --ppo-steps 1 --losses topk \
            --max-staleness "$staleness" --seed "$seed" --out "/tmp/opd-gpu-toy-$name" &&
            cp "/tmp/opd-gpu-toy-$name/results.json" "$RESULTS/gpu-toy_distill-$name.json" ||
            keep_logs "/tmp/opd-gpu-toy-$name" "gpu-toy-$name"
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
    [ ${#selected[@]} -gt 0 ] || selected=(scale push profile toy gkd services pipeline)
    for name in "${selected[@]}"; do
        case $name in scale | push | profile | toy | gkd | services | pipeline) ;; *) echo "unknown benchmark: $name" >&2; exit 2 ;; esac
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
    "$PY" -c "import fastapi, uvicorn, pydantic" || exit 1  # opd's servers (carried in .whl/)
    # toy and gkd compare with TRL, which needs datasets and through it pyarrow >= 24 (carried too, in
    # case the image's is older): find out before their long runs, and skip them if TRL cannot load
    trl=1
    "$PY" -c "import transformers, pyarrow, datasets, trl
print('transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__)" ||
        trl=0
    vllm=1
    "$PY" -c "import vllm" 2>/dev/null || vllm=0
    for name in "${selected[@]}"; do
        case $name in
        scale)
            run lm_head 30 bench.lm_head --gpu --out "$RESULTS/gpu-lm_head.json"
            run learner_scale 120 bench.learner_scale --gpu --out "$RESULTS/gpu-learner_scale.json"
            ;;
        push)  # whether the learner's pushes reach its torch samplers by CUDA IPC (else they go over HTTP)
            run push_shared 60 bench.push_check --shared cuda --out "$RESULTS/gpu-push_shared.json"
            ;;
        profile)  # where the toy step's time goes in each of opd's roles and GKD's, launches and syncs counted
            run toy_profile 120 bench.toy_profile --device cuda --out "$RESULTS/gpu-toy_profile.json"
            # and what each of its requests costs beyond the engine's own time, on the GPU
            run http_overhead 120 bench.http_overhead --device cuda --out "$RESULTS/gpu-http_overhead.json"
            # the tests CI has no GPU for: the torch sampler's captured decode steps against its eager
            # and its uncaptured decode (float32, bf16), and the learner's fused AdamW on CUDA
            run gpu_tests 120 pytest -q -p no:cacheprovider tests/test_static_decode.py tests/test_update.py \
                -k "captured or cuda"
            ;;
        toy | gkd) [ $trl -eq 1 ] || { failed+=("$name: TRL does not import (above), not run"); continue; } ;;&
        toy) toy ;;
        gkd)
            # time per step at Qwen2.5 shapes, opd sampled and top-k vs TRL GKD (issue 13; builds its
            # models first) (torch engines decode one token per forward: 128 tokens keep a step to
            # seconds; building the models and starting 2 x 2 servers take most of the limit)
            # (GKD runs first, then topk, then sampled; the file is rewritten after each, so a cut
            # run keeps them)
            run gkd "${OPD_GKD_LIMIT:-400}" bench.gkd_scale --device cuda --batch-size 16 --prompt-digits 120 \
                --max-tokens 128 --steps 6 --losses topk sampled --out "$RESULTS/gpu-gkd_scale.json"
            ;;
        services | pipeline) [ $vllm -eq 1 ] ||
            { failed+=("$name: vllm is not importable (carry its wheel in .whl/)"); continue; } ;;&
        services) run services 240 bench.gpu_bench --preset qwen2.5 --repeats 3 --out "$RESULTS/gpu-services.json" ;;
        pipeline) run pipeline 150 bench.pipeline --gpu --out "$RESULTS/gpu-pipeline.json" ;;
        esac
    done
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all benchmarks ran; results in $RESULTS"
