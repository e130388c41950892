#!/usr/bin/env bash
# Wheels of what `make gpu-check` needs and the device image lacks (DeepSpeed, datasets and their
# missing dependencies), for Python 3.12 on x86-64, into .whl/ (ignored by git): carry `.whl` in the
# device run and install with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PY:-python3}
# DeepSpeed ships an sdist only (its ops build just in time): build a pure-Python wheel here.
$PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8" || $PY -m pip wheel -q --no-deps -w .whl "deepspeed==0.19.8"
plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for pkg in "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "hjson==3.1.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"; do
  $PY -m pip download -q --no-deps $plat -d .whl "$pkg"
done
ls -la .whl
