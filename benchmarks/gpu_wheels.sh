#!/usr/bin/env bash
# Fill .whl/ (git-ignored; name it in the device call's `carry`) with the wheels benchmarks/gpu_check.sh installs on a GPU
# machine that has torch and transformers but nothing else memplan needs: pydantic, bitsandbytes (QLoRA, 8-bit AdamW)
# and DeepSpeed (its ZeRO cases; a pure-Python wheel built here, its ops left to compile on use, which memplan's
# plans never ask for) with its small dependencies. Binary wheels are fetched for the device's Python only.
#   [PYTHON=python-with-torch-and-pip] bash benchmarks/gpu_wheels.sh [DEVICE_PYTHON_VERSION]   (default 3.12)
# The working tree and .whl/ travel together within the device tool's 64 MiB: the total is printed.
set -eu
version=${1:-3.12}
tag=${version/./}
python=${PYTHON:-python3}
out=.whl
mkdir -p "$out"
fetch() { "$python" -m pip download -q --no-deps --only-binary=:all: -d "$out" "$@"; }
fetch einops hjson py-cpuinfo pydantic
fetch --python-version "$tag" --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 pydantic-core msgpack ninja bitsandbytes
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed  # needs torch here (setup.py imports it)
du -cb "$out"/*.whl | tail -n 1 | awk '{printf "wheels: %.1f MiB\n", $1 / 1048576}'
git ls-files -z | xargs -0 du -cb | tail -n 1 | awk '{printf "working tree: %.1f MiB (the device tool carries 64 MiB in all)\n", $1 / 1048576}'
