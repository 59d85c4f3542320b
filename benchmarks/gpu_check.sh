#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2317 # the steps run exported functions through bash -c
# GPU truth in one prepared command: install what the GPU machine lacks (from .whl/), record
# the machine, run the CUDA tests, the offload benchmark presets and the hook overhead, and
# bundle everything under $OUT as two files: summary.txt and gpu_results.tar.gz.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, at the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # the same plumbing on a CPU, in a minute or two
#
# Every step runs under its own `timeout`, and the whole under a budget (GPU_CHECK_BUDGET_S,
# default 540 s on the GPU): a step that fails or times out is recorded and the next one
# runs. After each step the bundle in $OUT is rewritten, so a run cut short still returns
# what it had. Exit status: 0 when every step passed, 1 when one did not, 2 for bad usage
# (OUT unset, say).
#
# Options:
#   --dry-run, --cpu   CPU plumbing check: no install (the packages must be importable), the
#                      CUDA tests of one file (all skipped without a device), tiny benchmarks
#   --only STEPS       comma-separated subset of: install,env,pytest,bench-compute,
#                      bench-bandwidth,bench-train,hook-overhead
# Environment:
#   OUT                    where the results go (required)
#   PYTHON                 the interpreter (default python3)
#   GPU_CHECK_DRY_RUN=1    the same as --dry-run
#   GPU_CHECK_BUDGET_S     seconds for the whole run (default 540; dry run 900)
#   GPU_CHECK_TEST_TIMEOUT seconds per test (default 90; dry run 120)
#   GPU_CHECK_PYTEST_PATHS test paths for `pytest -m cuda` (default tests; dry run
#                          tests/test_cuda.py)
set -u -o pipefail

usage() { sed -n '3,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run | --cpu) DRY_RUN=1 ;;
        --only) [ $# -ge 2 ] || { echo "gpu_check: --only needs a value" >&2; exit 2; }
            ONLY=$2; shift ;;
        --only=*) ONLY=${1#--only=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$DRY_RUN" = 1 ] || DRY_RUN=0
ALL_STEPS=",install,env,pytest,bench-compute,bench-bandwidth,bench-train,hook-overhead,"
for name in ${ONLY//,/ }; do
    case "$ALL_STEPS" in
        *",$name,"*) ;;
        *) echo "gpu_check: unknown step in --only: $name (one of${ALL_STEPS//,/ })" >&2; exit 2 ;;
    esac
done

if [ -z "${OUT:-}" ]; then
    echo "gpu_check: OUT is not set: name the folder for the results, e.g." \
        "OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh (the device tool sets it)" >&2
    exit 2
fi
if ! mkdir -p "$OUT" || [ ! -w "$OUT" ]; then
    echo "gpu_check: OUT=$OUT is not a writable folder" >&2
    exit 2
fi
OUT=$(cd "$OUT" && pwd)

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
# Nothing outside the GPU machine can be reached: no hub look-ups.
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
if [ "$DRY_RUN" = 1 ]; then
    # Plumbing only: generous limits, so that a busy machine does not fail the check.
    MODE=dry-run
    BUDGET=${GPU_CHECK_BUDGET_S:-900}
    TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-120}
    read -r -a PYTEST_PATHS <<<"${GPU_CHECK_PYTEST_PATHS:-tests/test_cuda.py}"
    LIMIT_PYTEST=300 LIMIT_COMPUTE=240 LIMIT_BANDWIDTH=240 LIMIT_TRAIN=240 LIMIT_HOOKS=240
else
    # About 7 minutes on an H200; the limits add up to more than the budget, which caps them.
    MODE=gpu
    BUDGET=${GPU_CHECK_BUDGET_S:-540}
    TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-90}
    read -r -a PYTEST_PATHS <<<"${GPU_CHECK_PYTEST_PATHS:-tests}"
    LIMIT_PYTEST=270 LIMIT_COMPUTE=150 LIMIT_BANDWIDTH=130 LIMIT_TRAIN=60 LIMIT_HOOKS=45
fi

# Results are gathered outside $OUT (only 8 files, 2 folders deep come back from there) and
# bundled into it after every step.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
WORK=$SCRATCH/gpu_results
mkdir -p "$WORK"
STEPS=$WORK/steps.tsv
printf 'step\trc\tseconds\tlimit_s\tstatus\n' >"$STEPS"
FAILED=0
START=$SECONDS

log() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - START))" "$*" | tee -a "$WORK/gpu_check.log"; }

bundle() {
    {
        printf 'gpu_check %s, mode %s, %ds of a %ds budget\n' \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$MODE" "$((SECONDS - START))" "$BUDGET"
        column -t -s "$(printf '\t')" "$STEPS" 2>/dev/null || cat "$STEPS"
        echo
        "$PYTHON" "$ROOT/benchmarks/gpu_summary.py" "$WORK" 2>&1
    } >"$OUT/summary.txt"
    cp "$OUT/summary.txt" "$WORK/summary.txt"
    tar -czf "$OUT/gpu_results.tar.gz.part" -C "$SCRATCH" gpu_results &&
        mv -f "$OUT/gpu_results.tar.gz.part" "$OUT/gpu_results.tar.gz"
}

selected() {
    [ -z "$ONLY" ] && return 0
    case ",$ONLY," in *",$1,"*) return 0 ;; esac
    return 1
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output in NAME.log, within
# what is left of the budget; records the exit status (124: timed out) and bundles.
step() {
    local name=$1 limit=$2
    shift 2
    selected "$name" || return 0
    local left=$((BUDGET - (SECONDS - START) - 10))
    if [ "$left" -lt 5 ]; then
        log "$name: skipped, the budget is spent"
        printf '%s\t-\t0\t0\tskipped (budget spent)\n' "$name" >>"$STEPS"
        FAILED=1
        bundle
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name: start (limit ${limit}s): $*"
    local began=$SECONDS rc status
    timeout --kill-after=10 "$limit" "$@" >>"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT after ${limit}s" ;;
        *) status=FAILED ;;
    esac
    [ "$rc" -eq 0 ] || FAILED=1
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - began))" "$limit" "$status" >>"$STEPS"
    log "$name: $status (rc $rc, $((SECONDS - began))s)"
    bundle
}

on_signal() {
    log "interrupted: bundling what there is"
    printf 'interrupted\t-\t-\t-\tsignal\n' >>"$STEPS"
    bundle
    exit 143
}
trap on_signal TERM INT

# --- the steps' commands (functions run under `timeout` through `bash -c`) -----------------

# Installs .whl/'s wheels (resolving against what the machine has, no index), then the project
# itself without its dependencies. Falls back to --target + PYTHONPATH, which later steps read
# from $WORK/pythonpath.
install_packages() {
    local imports="import hydra, omegaconf, pydantic, hydra_offload"
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: nothing is installed; checking that the packages import"
        (cd / && "$PYTHON" -c "$imports") && return 0
        echo "dry run: install the project first (pip install -e '.[dev]')"
        return 1
    fi
    local pip=("$PYTHON" -m pip install --no-index --no-cache-dir --disable-pip-version-check
        --root-user-action=ignore)
    if compgen -G ".whl/*.whl" >/dev/null; then
        local names
        names=$(for w in .whl/*.whl; do basename "$w" | cut -d- -f1; done | sort -u)
        # shellcheck disable=SC2086
        echo "wheels:" $names
        # shellcheck disable=SC2086
        if ! "${pip[@]}" --find-links .whl $names; then
            echo "resolving failed: installing the wheels as they are into /tmp/gpu_check_site"
            "${pip[@]}" --no-deps --target /tmp/gpu_check_site .whl/*.whl || return 1
            echo "/tmp/gpu_check_site" >>"$WORK/pythonpath"
            export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
        fi
    else
        echo "no .whl/ here (bash benchmarks/fetch_gpu_wheels.sh, then carry it)"
    fi
    if ! "${pip[@]}" --no-deps --no-build-isolation .; then
        echo "installing the project failed: it is imported from $ROOT through PYTHONPATH"
        echo "$ROOT" >>"$WORK/pythonpath"
        export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    fi
    (cd / && "$PYTHON" -c "$imports; print('imports ok:', hydra_offload.__file__)")
}

record_env() {
    echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  mode: $MODE  host: $(uname -n)"
    echo "== uname: $(uname -srm)"
    echo "== cpus: $(nproc)"
    free -g 2>/dev/null | sed 's/^/   /'
    echo "== commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo 'unknown (no .git here)')"
    # The same command at the repository root here names the tree that ran there.
    echo "== sources: $(find hydra_offload hydra_plugins tests benchmarks -name '*.py' | sort |
        xargs cat | sha256sum | cut -c1-16) (sha256 of the .py files of hydra_offload," \
        "hydra_plugins, tests, benchmarks, sorted by path)"
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,clocks.sm,$(
        )clocks.mem,clocks.max.sm,power.limit,pcie.link.gen.current,pcie.link.width.current
    else
        echo "nvidia-smi: not found"
    fi
    echo "== python"
    "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "capability",
          torch.cuda.get_device_capability(0), "memory GiB", round(props.total_memory / 2**30, 1),
          "SMs", props.multi_processor_count, "count", torch.cuda.device_count())
for name in ("hydra-offload", "hydra-core", "omegaconf", "pydantic", "lightning", "transformers",
             "accelerate", "diffusers", "bitsandbytes", "torchao", "peft", "numpy", "pytest",
             "pytest-timeout", "hypothesis"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} (not installed)")
EOF
}

run_pytest() {
    local args=(-m cuda -p no:cacheprovider -v -rfEs --durations=15)
    if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
        "$PYTHON" -m pytest "${args[@]}" --timeout "$TEST_TIMEOUT" \
            --junitxml "$WORK/pytest-junit.xml" "${PYTEST_PATHS[@]}"
        return
    fi
    # No pytest-timeout: one pytest per file that has CUDA tests, each under `timeout`.
    echo "pytest-timeout is missing: one run per file, each limited by timeout"
    local files file rc worst=0
    mapfile -t files < <(grep -rl --include='test_*.py' 'mark.cuda' "${PYTEST_PATHS[@]}" | sort)
    for file in "${files[@]}"; do
        echo "== $file"
        timeout --kill-after=10 "$((TEST_TIMEOUT * 4))" "$PYTHON" -m pytest "${args[@]}" \
            --junitxml "$WORK/pytest-junit-$(basename "$file" .py).xml" "$file"
        rc=$?
        echo "== $file: rc $rc"
        [ "$rc" -eq 5 ] && rc=0 # no CUDA test in this file
        [ "$rc" -gt "$worst" ] && worst=$rc
    done
    return "$worst"
}

PYTEST_PATHS_STR="${PYTEST_PATHS[*]}"
export -f install_packages record_env run_pytest
export DRY_RUN MODE WORK ROOT PYTHON TEST_TIMEOUT PYTEST_PATHS_STR

# --- the run ---------------------------------------------------------------------------------

log "mode $MODE, budget ${BUDGET}s, python $PYTHON, results in $OUT"
bundle

step install 120 bash -c install_packages
if [ -s "$WORK/pythonpath" ]; then
    PYTHONPATH=$(paste -sd: "$WORK/pythonpath")${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONPATH
    log "PYTHONPATH=$PYTHONPATH"
fi
step env 30 bash -c 'record_env >"$WORK/env.txt" 2>&1; rc=$?; cat "$WORK/env.txt"; exit $rc'
step pytest "$LIMIT_PYTEST" bash -c 'read -r -a PYTEST_PATHS <<<"$PYTEST_PATHS_STR"; run_pytest'

BENCH=("$PYTHON" benchmarks/offload_bench.py)
if [ "$DRY_RUN" = 1 ]; then
    TINY=(--device cpu --preset tiny --steps 1 --warmup 0 --setup-gb 0)
    step bench-compute "$LIMIT_COMPUTE" "${BENCH[@]}" "${TINY[@]}" --only "G=1 K=1 S=1" \
        --out "$WORK/bench-compute"
    step bench-bandwidth "$LIMIT_BANDWIDTH" "${BENCH[@]}" "${TINY[@]}" --only uva \
        --out "$WORK/bench-bandwidth"
    step bench-train "$LIMIT_TRAIN" "${BENCH[@]}" "${TINY[@]}" --train --only "G=1 K=1 S=1" \
        --out "$WORK/bench-train"
    step hook-overhead "$LIMIT_HOOKS" "$PYTHON" benchmarks/hook_overhead.py --layers 4 \
        --rounds 1 --out "$WORK/hook-overhead"
else
    # compute: 32k tokens per step. UVA is left out: zero-copy matmuls at that batch re-read
    # the weights over PCIe for every tile of rows (the bandwidth preset times UVA).
    step bench-compute "$LIMIT_COMPUTE" "${BENCH[@]}" --preset compute \
        --only prefetch diffusers accelerate --steps 5 --warmup 1 --setup-gb 2 \
        --out "$WORK/bench-compute"
    step bench-bandwidth "$LIMIT_BANDWIDTH" "${BENCH[@]}" --preset bandwidth --steps 5 \
        --warmup 1 --setup-gb 0 --out "$WORK/bench-bandwidth"
    # Fit steps on the small decoder: identical losses on the device, not the 87 GiB preset.
    step bench-train "$LIMIT_TRAIN" "${BENCH[@]}" --train --preset cpu --steps 5 --warmup 2 \
        --setup-gb 0 --out "$WORK/bench-train"
    step hook-overhead "$LIMIT_HOOKS" "$PYTHON" benchmarks/hook_overhead.py --rounds 3 \
        --out "$WORK/hook-overhead"
fi

NOT_OK=$(awk -F'\t' 'NR > 1 && $5 != "ok" {n++} END {print n + 0}' "$STEPS")
log "done in $((SECONDS - START))s: $NOT_OK step(s) not ok"
bundle
cat "$OUT/summary.txt"
rm -rf "$SCRATCH"
exit "$FAILED"
