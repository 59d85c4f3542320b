#!/usr/bin/env bash
# Downloads, into .whl/ at the repository root, the wheels that the GPU machine lacks for
# benchmarks/gpu_check.sh: CPython 3.12, manylinux x86_64, no dependencies resolved (each one
# the machine lacks is named below). The device machine reaches no registry; these wheels
# travel with the call (`carry: [".whl"]`, 64 MiB at most with the working tree).
#
#   bash benchmarks/fetch_gpu_wheels.sh          # then see benchmarks/README.md, "The GPU check"
#
# The versions are the ones the test suite passed with here, inside pyproject.toml's ranges.
# The image there already has torch, lightning, transformers, accelerate, numpy, PyYAML,
# packaging, huggingface-hub, safetensors, pytest, pytest-timeout, hypothesis, rich and
# matplotlib; it lacks what follows.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEST=.whl
PACKAGES=(
    # pyproject.toml [project] dependencies
    hydra-core==1.3.8 omegaconf==2.3.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0  # pydantic 2.14 needs >= 4.16; pip keeps a newer one there
    # [bench]: diffusers, and the one of its needs the image lacks
    diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0
    zipp==4.1.2  # importlib-metadata needs >= 3.20; pip keeps a newer one there
    # [dev]: jsonargparse[signatures] (LightningCLI)
    jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
    # the build backend, to install the project itself without an index
    hatchling==1.33.0 trove-classifiers==2026.9.21.13 tomlkit==0.15.2
    # [quant]: the quantized bases of tests/test_quantized.py (bitsandbytes is 41 MiB: its
    # CUDA kernels for every supported CUDA version)
    bitsandbytes==0.50.2 torchao==0.18.0 peft==0.21.2
)
# Published as source only: built here into a pure-Python wheel (py3-none-any).
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)
LIMIT_MIB=${LIMIT_MIB:-60}  # the rest of the 64 MiB is the working tree's (1.4 MiB)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the whole install there
for package in "${PACKAGES[@]}"; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$DEST" "$package"
done
for package in "${SOURCE_ONLY[@]}"; do
    "$PYTHON" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$DEST" "$package"
done
for wheel in "$DEST"/*.whl; do
    case "$wheel" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*manylinux*x86_64*.whl) ;;
        *-py3-none-manylinux*x86_64.whl | *-abi3-manylinux*x86_64*.whl) ;;
        *) echo "fetch_gpu_wheels: $wheel is not for CPython 3.12 on x86-64" >&2; exit 1 ;;
    esac
done

expected=$((${#PACKAGES[@]} + ${#SOURCE_ONLY[@]}))
count=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$count" -ne "$expected" ]; then
    echo "fetch_gpu_wheels: expected $expected wheels in $DEST, found $count" >&2
    exit 1
fi
du -b "$DEST"/*.whl | sort -n | awk '{printf "%9.1f KiB  %s\n", $1 / 1024, $2}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$count wheels, $(awk -v b="$total" 'BEGIN {printf "%.2f MiB", b / 1048576}') in $DEST"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "fetch_gpu_wheels: over ${LIMIT_MIB} MiB: the call's 64 MiB would not hold them" >&2
    exit 1
fi
