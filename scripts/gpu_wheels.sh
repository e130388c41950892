#!/usr/bin/env bash
# Wheels of what `make gpu-check` needs and the device image lacks, for its python3 (CPython 3.12,
# manylinux x86-64), into .whl/ (ignored by git through .git/info/exclude). Carry `.whl` in the device
# run and install them first (scripts/gpu_check.py's docstring and docs/GPU.md have the one-line command):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#
# The image (/work/.library/device/KINDS.md, read 2026-11) has torch 2.11, triton 3.6, transformers 5.17,
# accelerate, tokenizers, safetensors, huggingface-hub 1.33, numpy, pandas, pyarrow, fsspec, xxhash, msgpack,
# ninja, py-cpuinfo, psutil, einops, packaging, pyyaml, jinja2, tqdm, nvidia-ml-py, pytest and pytest-xdist.
# Carried, at the versions the venv runs (.venv, setup.py's ranges):
#   deepspeed 0.19.8 (pure Python; its ops are never built: the check's run uses torch_adam) and what it needs
#     that the image lacks: hjson, pydantic + pydantic-core + annotated-types + typing-inspection, and
#     typing-extensions 4.16 (pydantic 2.14 needs >= 4.16; the image's version is not known);
#   datasets 5.2.0 (the run reads its data through it) and its missing needs dill and multiprocess, with
#     fsspec 2026.9.0 (datasets pins fsspec <= 2026.9.0; the image's may be newer);
#   transformers 5.24.0, the version tested here (the image's 5.17 is in setup.py's range too: set
#     GPU_WHEELS_TRANSFORMERS=0 to use it and carry 13 MB less).
# Not carried: pyarrow (datasets 5.2 asks for >= 24; its wheel, 49-55 MB, does not fit in the 64 MiB that
# travels with the 13 MB working tree). The image's pyarrow is used: the check's env step prints its version,
# flags an unmet pin, and loads the demo data through `datasets` before the run does.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LIMIT=$((64 * 1024 * 1024))  # what travels to the device: the working tree and the carried paths together
rm -rf .whl && mkdir -p .whl

# DeepSpeed ships an sdist (its ops build at install or just in time): a pure-Python wheel, no op built in.
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8" \
  || DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w .whl "deepspeed==0.19.8"

plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
pkgs=(
  "hjson==3.1.0"
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0"
  "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "fsspec==2026.9.0"
)
[ "${GPU_WHEELS_TRANSFORMERS:-1}" = 0 ] || pkgs+=("transformers==5.24.0")
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps $plat -d .whl "${pkgs[@]}"

# One version of each: two stop the device's install.
dupes=$(ls .whl | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu_wheels: more than one wheel of: $dupes" >&2; exit 1; }

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -cb 2>/dev/null \
  | awk '$2 == "total" {s += $1} END {print s + 0}')
ls -l .whl | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
total=$((wheels + tree))
awk -v w="$wheels" -v t="$tree" 'BEGIN {m = 1048576; printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB that may travel\n", w / m, t / m, (w + t) / m}'
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu_wheels: over the device's 64 MiB carry limit" >&2
  exit 1
fi
