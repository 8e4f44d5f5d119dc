#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks, as wheels in .whl/ for bench/device.sh to install:
#
#   bash bench/wheels.sh      # here, where pip can reach an index; then carry .whl (and runs/toy)
#
# The device image (Python 3.12, torch, transformers, accelerate, peft, httpx, tensorboard, pandas,
# pyarrow) has none of opd's serving stack (fastapi, starlette, uvicorn, pydantic) nor TRL and its
# datasets for the toy comparison. Each wheel is the version installed here, so the device runs
# what CI tested; --no-deps, so only the packages named below travel (about 5 MB). vLLM is not among
# them: its GPU build and its own needs are far over one call's 64 MiB carry (BENCHMARKS.md), so the
# services and pipeline benchmarks report themselves skipped without it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
packages=(fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection typing-extensions trl datasets dill
          multiprocess)
pins=()
for name in "${packages[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) ||
        { echo "$name is not installed in $PY: run .ci/run first" >&2; exit 1; }
    pins+=("$name==$version")
done
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
ls -l .whl
du -sh .whl
