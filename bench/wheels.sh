#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks, as wheels in .whl/ for bench/device.sh to install:
#
#   bash bench/wheels.sh      # here, where pip can reach an index; then carry .whl (and runs/toy)
#
# The device image (Python 3.12, torch, transformers, accelerate, peft, httpx, tensorboard, pandas)
# has none of opd's serving stack (fastapi, starlette, uvicorn, pydantic) nor TRL and its datasets
# for the toy comparison, and its pyarrow may be older than datasets needs. Each wheel is the version
# installed here, so the device runs what CI tested; --no-deps, so only the packages named below
# travel. pyarrow's wheel (55 MB) is slimmed to about 34 MB, without the parts datasets never loads
# (Flight, S3, C++ headers, tests), so that it, runs/toy and the tree fit one call's 64 MiB carry.
# vLLM is not among them: its GPU build and its own needs are far over that (BENCHMARKS.md), so the
# services and pipeline benchmarks report themselves skipped without it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
packages=(fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection typing-extensions trl datasets dill
          multiprocess pyarrow)
pins=()
for name in "${packages[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) ||
        { echo "$name is not installed in $PY: run .ci/run first" >&2; exit 1; }
    pins+=("$name==$version")
done
mkdir -p .whl
rm -f .whl/pyarrow-*.whl  # the slimmed one of an earlier run: one pyarrow wheel, as pip downloads it
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
# drop pyarrow's unused parts, and their rows in RECORD (pip installs what the archive holds)
"$PY" - .whl/pyarrow-*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
unused = re.compile(r"pyarrow/(include/|tests/|src/|.*flight|libarrow_s3|_s3fs|libarrow_python\.so$|"
                    r"libarrow_python\.so\.\d+\.\d+\.\d+$|.*\.pyx$|.*\.pxd$)")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as whole, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as kept:
    for item in whole.infolist():
        if not unused.match(item.filename):
            data = whole.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                rows = [row for row in data.decode().splitlines() if not unused.match(row.split(",")[0])]
                data = ("\n".join(rows) + "\n").encode()
            kept.writestr(item, data)
slim.replace(wheel)
EOF
ls -l .whl
du -sh .whl
