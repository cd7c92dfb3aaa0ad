#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (H100/H200, torch 2.11 + CUDA 13, nvcc, ninja,
# Triton, Python 3.12 as `python3`, no FFCV/DALI/nvImageCodec, no internet), run from the repository root:
#
#   OUT=/some/empty/dir bash benchmarks/gpu_check.sh          # on the GPU machine ($OUT is set there)
#   OUT=/tmp/gpucheck bash benchmarks/gpu_check.sh            # CPU dry run: tiny sizes, CUDA stages skipped
#
# nvImageCodec travels as wheels in the ignored folder .whl/ (28 MB; carry it: `run`'s carry=[".whl"]),
# fetched once on a machine with pip access (Python 3.12 wheels for the GPU machine):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
# Without .whl/ the nvimgcodec rows are skipped (build_loader falls back to torch), the rest runs.
#
# Stages, each under its own `timeout`, each recorded pass/fail/skip, a failure never stops the rest;
# a stage that would start after BUDGET_S seconds (default 360) is skipped and every stage's timeout
# is cut to end by BUDGET_S + 120 s, so the check ends within 8 minutes whatever happens (a rerun
# fits in the rest of a 15-minute lease only without the machine's start-up). Order = priority:
# kernel, the default step, end to end with the default step, the GPU tests, then the rest (what
# the budget leaves out can be rerun with ONLY="profile loader fold cache e2e192 loss losstest"):
#   env      GPU (nvidia-smi), driver, torch/CUDA/cuDNN/Triton/torchvision, nvcc, ninja, cores
#   install  make `fastkd` importable with no internet: `pip install --no-build-isolation --no-deps
#            --no-index -e .` (setuptools maps preprocess/ -> fastkd.preprocess and kernels/ ->
#            fastkd.kernels); if that fails, a PYTHONPATH shim (sitecustomize finder) does the mapping
#   wheels   the carried .whl/*.whl (nvImageCodec + nvJPEG) into python3's site-packages (else
#            --target + PYTHONPATH), then whether the GPU's hardware JPEG engines decode (probe)
#   kernel   build the CUDA loss kernel (torch.utils.cpp_extension, first use) and compare the fused
#            op with the reference on random bf16/fp32 logits (relative error printed)
#   step     benchmarks/step_throughput.py at 160 px x 256: fp32 NCHW eager (the baseline), bf16 +
#            fused loss eager, and `default`: the trainer's default step (the whole step in CUDA
#            graphs, teacher BN folded in bf16), its compile timed apart (STEP_VARIANTS: another list)
#   data     16 x 384 synthetic photo-sized JPEGs -> `fastkd pack --formats dali` (or DATA=packed/dir)
#   e2e      benchmarks/e2e_throughput.py at 160 px: the default step fed by E2E_PATHS (default
#            torch-host, nvimgcodec, torch) with cores - 1 workers, against synthetic device data
#   gputest  pytest -m gpu tests/ (failing names in the short summary and printed last)
#   profile  benchmarks/step_profile.py: GPU time per part of the step (eager, ranges) and the
#            default step's top kernels and GPU-busy share
#   loader   benchmarks/loader_throughput.py, every decode path: torch (nvJPEG CUDA decoder),
#            nvimgcodec (hardware JPEG engines, ROI), nvimgcodec-gpu (CUDA decoder, ROI),
#            nvimgcodec-cpu (host cores, ROI, then GPU resize), auto (the rule's choice), torch-host
#            (host cores: decode + crop + resize in DataLoader workers, pinned copy); the host-core
#            paths once per count of HOST_WORKERS (8 and cores - 1); at 160 px, then DECODE_PATHS_192
#            at 192 px with cores - 1 workers (GPU mode; the dry run: 32 px only)
#   engines  benchmarks/jpeg_engines.py: 256 synthetic 400 px JPEGs decoded by torchvision's batched
#            nvJPEG, nvImageCodec's CUDA decoder and its hardware decoder while nvidia-smi dmon
#            samples the JPEG engines: whether each path used them (labels decode_table.md)
#   fold     the default step with the teacher's BatchNorm not folded (default_unfolded): what
#            folding buys, against the step stage's `default` row (GPU only)
#   cache    benchmarks/teacher_cache_step.py: the default step with a teacher cache vs the live
#            teacher (GPU only)
#   e2e192   end to end at 192 px, DECODE_PATHS_192, the default step
#   loss     benchmarks/loss_kernel.py --device cuda
#   losstest pytest of the loss tests (CPU reference, op under compile; GPU ones too)
# Last: benchmarks/run_all.py --collect merges the JSONs into results.{json,md,png},
# benchmarks/decode_table.py tabulates the loader and e2e rows per decode path, then a short
# table (stages + goals) is printed. Under $OUT (at most 8 files, none in sub-folders):
#   gpu_check.log  this console output       summary.md   stage table + results.md
#   results.json   all benchmark JSONs + stages + machine     results.png  bar chart
#   decode_table.md  per decode path: loader / e2e / ImageNet-100 epoch at 160 + 192 px
#   logs.tar.gz    every stage's full log, the JSONs and the results folder
# Environment knobs: PY (python; default .venv/bin/python if present, else python3), BUDGET_S,
# DATA (a packed dir), WORK (scratch dir), QUICK=1 (tiny sizes even on a GPU), FORCE_SHIM=1 (test
# the shim), ONLY="kernel step" (rerun just these stages; env, install and wheels always run; a
# stage that needs data needs `data` too, unless DATA is given), STEP_VARIANTS (the step
# benchmark's --variants, replacing the mode's list), E2E_VARIANT (the e2e stages' step, default
# `default`), E2E_PATHS (the first e2e stage's --backends), DECODE_PATHS (the loader stage's
# --backends), HOST_WORKERS (its
# --workers sweep of the host-core paths), DECODE_PATHS_192 (the 192 px pass's --backends).
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
: "${OUT:?set OUT to an (empty) output folder}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
W=${WORK:-$(mktemp -d /tmp/fastkd-gpucheck.XXXXXX)}
mkdir -p "$W/logs" "$W/json"
BUDGET_S=${BUDGET_S:-360}      # no stage starts after this many seconds
HARD_S=$(( BUDGET_S + 120 ))   # and none runs past this: the whole check ends within 8 minutes
START=$(date +%s)
STAGES="$W/stages.tsv"
: > "$STAGES"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PY W REPO   # read by the functions that `stage` runs through bash -c
unset FASTKD_LOSS_IMPL
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

elapsed() { echo $(( $(date +%s) - START )); }

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAS_CUDA=1
else
  HAS_CUDA=0
fi
if [ "$HAS_CUDA" = 1 ] && [ "${QUICK:-0}" != 1 ]; then MODE=gpu; else MODE=dry; fi
echo "gpu_check: repo $REPO | python $PY | CUDA $HAS_CUDA | mode $MODE | work $W | budget ${BUDGET_S}s"

# stage NAME TIMEOUT_S NEEDS(cuda|any) CMD...: run CMD under timeout, log to $W/logs/NAME.log,
# show its last lines, record "NAME status seconds note" in $STAGES.
stage() {
  local name=$1 limit=$2 needs=$3
  shift 3
  local now; now=$(elapsed)
  if [ -n "${ONLY:-}" ] && [ "$name" != env ] && [[ " $ONLY " != *" $name "* ]]; then
    printf '%s\tskip\t0\tnot in ONLY\n' "$name" >> "$STAGES"
    return 0
  fi
  if [ "$needs" = cuda ] && [ "$HAS_CUDA" != 1 ]; then
    printf '%s\tskip\t0\tneeds CUDA\n' "$name" >> "$STAGES"
    echo "=== [$name] skipped: needs CUDA"
    return 0
  fi
  if [ "$now" -ge "$BUDGET_S" ]; then
    printf '%s\tskip\t0\tover budget (%ss)\n' "$name" "$now" >> "$STAGES"
    echo "=== [$name] skipped: ${now}s elapsed, budget ${BUDGET_S}s"
    return 0
  fi
  if [ "$limit" -gt $(( HARD_S - now )) ]; then limit=$(( HARD_S - now )); fi  # end by HARD_S
  echo "=== [$name] t=${now}s timeout ${limit}s: $*"
  local t0 rc status note=""
  t0=$(date +%s)
  if [ "$(type -t "$1")" = function ]; then  # timeout runs programs: a shell function goes via bash -c
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); \"\$@\"" _ "$@" > "$W/logs/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" > "$W/logs/$name.log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=pass ;;
    5) if [ "$name" = gputest ]; then status=pass; note="no test collected"; else status=fail; note="exit 5"; fi ;;
    124|137) status=fail; note="timeout ${limit}s" ;;
    *) status=fail; note="exit $rc" ;;
  esac
  tail -n "${TAIL_LINES:-12}" "$W/logs/$name.log" | sed "s/^/  [$name] /"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$note" >> "$STAGES"
  echo "=== [$name] $status in $(( $(date +%s) - t0 ))s ${note}"
  return 0
}

# ------------------------------------------------------------------ env
env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  cores: $(nproc)"
  free -g 2>/dev/null | head -2
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not found"
  command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: not found"
  "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
for mod in ("torchvision", "triton", "numpy", "PIL", "yaml", "rich", "matplotlib", "sklearn", "pytest", "ffcv", "nvidia.dali"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{mod}: not importable ({type(e).__name__})")
EOF
}
TAIL_LINES=40 stage env 60 any env_report

# ------------------------------------------------------------------ install
fastkd_importable() {
  (cd / && "$PY" - <<'EOF'
import importlib, sys
bad = 0
for name in ("fastkd", "fastkd.preprocess", "fastkd.kernels", "fastkd.losses", "fastkd.data", "fastkd.train"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {mod.__file__}")
    except Exception as error:  # report every module, not only the first failure
        bad += 1
        print(f"{name}: NOT importable: {type(error).__name__}: {error}")
sys.exit(1 if bad else 0)
EOF
  )
}
make_shim() {
  mkdir -p "$W/shim"
  cat > "$W/shim/sitecustomize.py" <<EOF
# gpu_check.sh shim: the package-dir mapping of pyproject.toml without an install.
import importlib.abc, importlib.util, os, sys
_MAP = {"fastkd.preprocess": "$REPO/preprocess", "fastkd.kernels": "$REPO/kernels"}
class _FastkdDirs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        d = _MAP.get(name)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"),
                                                      submodule_search_locations=[d])
sys.meta_path.insert(0, _FastkdDirs())
EOF
}
install_fastkd() {
  if [ "${FORCE_SHIM:-0}" != 1 ] && fastkd_importable; then return 0; fi
  if [ "${FORCE_SHIM:-0}" != 1 ]; then
    echo "+ pip install --no-build-isolation --no-deps --no-index -e ."
    "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e "$REPO" && fastkd_importable && return 0
    echo "pip editable install failed: falling back to the PYTHONPATH shim"
  fi
  make_shim
  export PYTHONPATH="$W/shim:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  fastkd_importable
}
# runs in this shell (not via `stage`, and a function with a redirection stays in this shell)
# so that a PYTHONPATH shim reaches the later stages
echo "=== [install] t=$(elapsed)s"
t0=$(date +%s)
if install_fastkd > "$W/logs/install.log" 2>&1; then st=pass; else st=fail; fi
sed 's/^/  [install] /' "$W/logs/install.log" | tail -8
case "${PYTHONPATH:-}" in *"$W/shim"*) how="PYTHONPATH shim" ;; *) how="installed" ;; esac
printf 'install\t%s\t%s\t%s\n' "$st" "$(( $(date +%s) - t0 ))" "$how" >> "$STAGES"
echo "=== [install] $st"
FASTKD="$PY -m fastkd.cli"
export FASTKD

# ------------------------------------------------------------------ carried wheels (nvImageCodec)
install_wheels() {
  if "$PY" -c "from nvidia import nvimgcodec" 2>/dev/null; then
    echo "nvImageCodec already importable: carried wheels not installed"
  elif ! ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/*.whl carried: nvimgcodec rows will be skipped (fallback to torch)"; return 1
  else
    echo "+ pip install --no-index --no-deps $(cd "$REPO/.whl" && ls *.whl | tr '\n' ' ')"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile "$REPO"/.whl/*.whl ||
       ! "$PY" -c "from nvidia import nvimgcodec" 2>/dev/null; then
      echo "site-packages install failed or shadowed: --target $W/site + PYTHONPATH"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$REPO"/.whl/*.whl || return 1
      export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  "$PY" - <<'EOF'
import torch
from nvidia import nvimgcodec
from fastkd.data.nvimgcodec_loader import hardware_missing
print("nvImageCodec", nvimgcodec.__version__, "CUDA", nvimgcodec.__cuda_version__)
if torch.cuda.is_available():
    print("hardware JPEG engines:", hardware_missing(0) or f"yes ({torch.cuda.get_device_name(0)})")
EOF
}
# in this shell (not via `stage`), like install: a PYTHONPATH it sets reaches the later stages
echo "=== [wheels] t=$(elapsed)s"
t0=$(date +%s)
if install_wheels > "$W/logs/wheels.log" 2>&1; then st=pass; else st=fail; fi
sed 's/^/  [wheels] /' "$W/logs/wheels.log" | tail -8
note=$(tail -1 "$W/logs/wheels.log" | tr '\t' ' ' | cut -c1-80)
printf 'wheels\t%s\t%s\t%s\n' "$st" "$(( $(date +%s) - t0 ))" "$note" >> "$STAGES"
echo "=== [wheels] $st"

# ------------------------------------------------------------------ kernel build + check
kernel_check() {
  "$PY" - <<'EOF'
import time, torch
t0 = time.perf_counter()
from fastkd.kernels.build import load_extension
load_extension()  # builds (or loads the cached build); raises with the compiler's log on failure
print(f"CUDA extension ready in {time.perf_counter() - t0:.1f} s")
from fastkd.losses import LossConfig, distillation_loss
cfg = LossConfig.from_method("uadkd", temperature=4.0)
torch.manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    for B, C in ((256, 100), (37, 1000)):
        t = (torch.randn(B, C, device="cuda") * 3).to(dtype)
        sa = (torch.randn(B, C, device="cuda") * 3).to(dtype).requires_grad_()
        sb = (torch.randn(B, C, device="cuda") * 3).to(dtype).requires_grad_()
        y = torch.randint(0, C, (B,), device="cuda")
        outs, grads = [], []
        for fused in (True, False):
            out = distillation_loss(t, [sa, sb], y, cfg, fused=fused)
            ga, gb = torch.autograd.grad(out["loss"], [sa, sb])
            outs.append(out["loss"].float()); grads.append(torch.cat([ga.float().flatten(), gb.float().flatten()]))
        torch.cuda.synchronize()
        rel_l = ((outs[0] - outs[1]).abs() / outs[1].abs().clamp_min(1e-12)).item()
        rel_g = ((grads[0] - grads[1]).norm() / grads[1].norm().clamp_min(1e-12)).item()
        if dtype == torch.float32:
            worst = max(worst, rel_l, rel_g)
        print(f"{str(dtype):15s} B={B:4d} C={C:4d}: loss rel err {rel_l:.2e}, grad rel err {rel_g:.2e}")
print(f"fused op built and checked in {time.perf_counter() - t0:.1f} s")
assert worst < 1e-4, f"fp32 fused vs reference relative error (loss or grad) {worst:.2e} >= 1e-4"
EOF
}
stage kernel 180 cuda kernel_check

# ------------------------------------------------------------------ step benchmark
# Right after the kernel: the trainer's default step (what `fastkd train` runs: compile.mode auto =
# the whole step in CUDA graphs, teacher BN folded in bf16) against the eager steps, at 160 px x 256
# (the goal shape); the default step's compile (about 1.5 minutes on an H200) is timed apart.
# STEP_VARIANTS replaces the list. It writes its JSON after each shape and starts nothing new after
# --max-seconds, so it always reports something.
if [ "$MODE" = gpu ]; then
  STEP_ARGS=(--res 160 --batch 256 --windows 5 --steps 3 --warmup 2 --max-seconds 150
             --variants "${STEP_VARIANTS:-fp32_nchw,bf16_cl_fused,default}")
  STEP_T=210
else
  # the dry run: tiny shapes; the default step is eager on a CPU, the compiled one goes through
  # cudagraphs (on CPU: dynamo + AOT autograd, ~40 s), not inductor's C++ (minutes)
  STEP_ARGS=(--res 32 --batch 4 --steps 1 --windows 2 --warmup 1 --compile-mode cudagraphs
             --variants "${STEP_VARIANTS:-fp32_nchw,bf16_cl_fused,default,bf16_cl_compiled}")
  STEP_T=300  # shared CPUs: tiny shapes can still take minutes
fi
stage step "$STEP_T" any "$PY" benchmarks/step_throughput.py "${STEP_ARGS[@]}" --json "$W/json/step.json"

# ------------------------------------------------------------------ data: synthetic folder -> pack
if [ "$MODE" = gpu ]; then SYNTH="--classes 16 --train 384 --val 4 --size 400"; else SYNTH="--classes 4 --train 12 --val 2 --size 96"; fi
export SYNTH
make_data() {
  # shellcheck disable=SC2086  # SYNTH is a list of flags
  "$PY" benchmarks/common.py synth-folder "$W/src" $SYNTH &&
  $FASTKD pack "$W/src" "$W/packed" --classes all --formats dali --workers "$(nproc)" &&
  test -f "$W/packed/manifest.json"
}
if [ -n "${DATA:-}" ]; then
  PACKED=$DATA
  printf 'data\tpass\t0\tcarried %s\n' "$DATA" >> "$STAGES"
else
  PACKED="$W/packed"
  stage data 90 any make_data
fi

# ------------------------------------------------------------------ loader benchmark (every decode path)
DECODE_PATHS=${DECODE_PATHS:-torch,nvimgcodec,nvimgcodec-gpu,nvimgcodec-cpu,auto,torch-host}
DECODE_PATHS_192=${DECODE_PATHS_192:-torch,nvimgcodec,torch-host}
LAST_CORE=$(( $(nproc) - 1 )); [ "$LAST_CORE" -lt 1 ] && LAST_CORE=1
if [ "$MODE" = gpu ]; then
  # host-core paths once per count (torch-host w8, torch-host w15 on 16 cores), the GPU paths once
  if [ "$LAST_CORE" -gt 8 ]; then HOST_WORKERS=${HOST_WORKERS:-8,$LAST_CORE}; else HOST_WORKERS=${HOST_WORKERS:-$LAST_CORE}; fi
  LOADER_EXTRA=(--device cuda --batch-size 256 --epochs 2)
  LOADER_RES=(160 192)
else
  HOST_WORKERS=${HOST_WORKERS:-}  # the dry run: each backend's default workers, names unchanged
  LOADER_EXTRA=(--device cpu --batch-size 8 --epochs 1)
  LOADER_RES=(32)
fi
export PACKED DECODE_PATHS DECODE_PATHS_192 HOST_WORKERS LAST_CORE
# decode_runs SCRIPT JSON_STEM ARGS...: SCRIPT at each resolution of LOADER_RES (the first with
# every DECODE_PATHS and the HOST_WORKERS sweep, the next with DECODE_PATHS_192 on cores - 1
# workers); one JSON each: STEM.json, STEM-192.json
decode_runs() {
  local script=$1 stem=$2 res rc=0 first=1
  shift 2
  for res in $LOADER_RES_LIST; do
    if [ "$first" = 1 ]; then
      "$PY" "$script" --data "$PACKED" --backends "$DECODE_PATHS" ${HOST_WORKERS:+--workers "$HOST_WORKERS"} \
        "$@" "$RES_FLAG" "$res" --json "$W/json/$stem.json" || rc=1
    else
      "$PY" "$script" --data "$PACKED" --backends "$DECODE_PATHS_192" --workers "$LAST_CORE" \
        "$@" "$RES_FLAG" "$res" --json "$W/json/$stem-$res.json" || rc=1
    fi
    first=0
  done
  return $rc
}
# ------------------------------------------------------------------ end to end, the default step
# The loaders feed the trainer's default step (E2E_VARIANT replaces it); first at 160 px with the
# decode paths most likely to keep up (E2E_PATHS), the loader table and 192 px come later.
if [ "$MODE" = gpu ]; then E2E_ARGS=(--steps 30 --warmup 4); else E2E_ARGS=(--batch 4 --steps 2 --warmup 1); fi
E2E_ARGS+=(--variant "${E2E_VARIANT:-default}")
E2E_PATHS=${E2E_PATHS:-torch-host,nvimgcodec,torch}
e2e_first() {
  "$PY" benchmarks/e2e_throughput.py --data "$PACKED" --backends "$E2E_PATHS" --workers "$LAST_CORE" \
    "$@" --res "${LOADER_RES_LIST%% *}" --json "$W/json/e2e.json"
}
export E2E_PATHS
LOADER_RES_LIST="${LOADER_RES[*]}"
export LOADER_RES_LIST
stage e2e 200 any e2e_first "${E2E_ARGS[@]}"

# ------------------------------------------------------------------ gpu tests
# -rfEs: failures and errors are named in the short summary (a bare -rs hid them); -p no:logging:
# no captured log records (torch's compile logs at DEBUG filled a failure's report); the failing
# names are printed last, so the stage's tail shows them.
gpu_tests() {
  "$PY" -m pytest -q -rfEs --tb=short -p no:logging -p no:cacheprovider -m gpu tests \
    --continue-on-collection-errors --junitxml "$W/json/gputest.xml"
  local rc=$?
  grep -o 'classname="[^"]*" name="[^"]*"[^>]*>[[:space:]]*<\(failure\|error\)' "$W/json/gputest.xml" 2>/dev/null |
    sed 's/classname="\([^"]*\)" name="\([^"]*\)".*/FAILED \1::\2/' || true
  return $rc
}
stage gputest 150 any gpu_tests

# ------------------------------------------------------------------ the rest, by priority
if [ "$MODE" = gpu ]; then PROFILE_ARGS=(--steps 5); else PROFILE_ARGS=(--steps 1 --no-default); fi
stage profile 150 any "$PY" benchmarks/step_profile.py "${PROFILE_ARGS[@]}" --json "$W/json/profile.json"

export RES_FLAG=--resolution
stage loader 150 any decode_runs benchmarks/loader_throughput.py loader "${LOADER_EXTRA[@]}"
# whether each GPU decode path (torchvision's batched nvJPEG above all) ran on the JPEG engines:
# dmon's jpg column while it decodes; decode_table.py labels the GPU rows with the verdicts
stage engines 60 cuda "$PY" benchmarks/jpeg_engines.py --seconds 4 --json "$W/json/engines.json"

if [ "$MODE" = gpu ]; then
  stage fold 150 any "$PY" benchmarks/step_throughput.py --res 160 --batch 256 --windows 5 --steps 3 --warmup 2 \
    --variants default_unfolded --json "$W/json/step-unfolded.json"
fi

if [ "$MODE" = gpu ]; then  # the teacher cache's speed-up with the default step
  stage cache 150 any "$PY" benchmarks/teacher_cache_step.py --device cuda --json "$W/json/cache.json"
fi

# e2e at the other resolutions (192 px), every DECODE_PATHS_192 path
if [ "${LOADER_RES_LIST#* }" != "$LOADER_RES_LIST" ]; then
  e2e_rest() {
    local res
    for res in ${LOADER_RES_LIST#* }; do
      "$PY" benchmarks/e2e_throughput.py --data "$PACKED" --backends "$DECODE_PATHS_192" --workers "$LAST_CORE" \
        "$@" --res "$res" --json "$W/json/e2e-$res.json" || return 1
    done
  }
  stage e2e192 180 any e2e_rest "${E2E_ARGS[@]}"
fi

# ------------------------------------------------------------------ loss benchmark
if [ "$MODE" = gpu ]; then LOSS_ARGS=(--device cuda); else LOSS_ARGS=(--device cpu --quick --warmup 1 --iters 3 --no-compile); fi
stage loss 120 any "$PY" benchmarks/loss_kernel.py "${LOSS_ARGS[@]}" --json "$W/json/loss.json"

# ------------------------------------------------------------------ loss tests (CPU + GPU)
LOSS_TESTS=$(ls tests/test_loss*.py tests/test_kernel*.py 2>/dev/null | tr '\n' ' ')
if [ -n "$LOSS_TESTS" ]; then
  stage losstest 150 any "$PY" -m pytest -q -rs $LOSS_TESTS -p no:cacheprovider --continue-on-collection-errors
else
  printf 'losstest\tskip\t0\tno tests/test_loss*.py\n' >> "$STAGES"
fi

# ------------------------------------------------------------------ collect + summary
RESDIR="$W/results"
"$PY" benchmarks/run_all.py --collect "$W/json" --stages "$STAGES" --out "$RESDIR" > "$W/logs/collect.log" 2>&1 \
  || { echo "run_all --collect failed:"; tail -5 "$W/logs/collect.log"; }
for f in results.json results.png; do [ -f "$RESDIR/$f" ] && cp "$RESDIR/$f" "$OUT/$f"; done
"$PY" benchmarks/decode_table.py "$W/json" --res "$(echo "$LOADER_RES_LIST" | tr ' ' ',')" \
  --out "$OUT/decode_table.md" > "$W/logs/decode_table.log" 2>&1 \
  || { echo "decode_table failed:"; tail -5 "$W/logs/decode_table.log"; }
[ -f "$RESDIR/results.md" ] && cp "$RESDIR/results.md" "$OUT/summary.md"
tar -czf "$OUT/logs.tar.gz" -C "$W" logs json results stages.tsv 2>/dev/null
echo
echo "gpu_check finished in $(elapsed)s (mode $MODE); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
"$PY" benchmarks/run_all.py --summary "$RESDIR/results.json" 2>/dev/null || column -t -s $'\t' "$STAGES"
exec 1>&- 2>&-   # let tee see end-of-file and finish gpu_check.log before the script returns
wait "$TEE_PID" 2>/dev/null
exit 0
