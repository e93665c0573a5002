#!/usr/bin/env bash
# One prepared GPU session for issue 7 (at most 8.5 minutes on one H100/H200): throughput of the
# notebook loop and the packed project loop at 256 and 512 px (every step variant, K = 1..16),
# a psnr_ema trajectory check of the fastest variant against fp32 eager, and a short study
# run as `train` with repeats over every input mode (the GPU image has no Ray, Optuna or
# MLflow). Each stage has its own time limit, and everything is written as it
# goes to bench/results/gpu_session_<device>_<stamp>/ (and copied to $OUT when set, as the
# device runner returns $OUT), with the command and the device at the top of each file.
#
#   bash bench/gpu_session.sh                  # from the repository root, on a GPU machine
#   PY=/path/to/python bash bench/gpu_session.sh   # a Python with the project's dependencies
#
# Then put the tables in README "Performance" and, if the measurements say so, change
# models/step.py StepOptions.auto (bf16) and study/tune.py DEFAULT_GPU_SHARE.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEV=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'no-cuda')")
if [ "$DEV" = "no-cuda" ]; then echo "error: no CUDA device here; this script measures a GPU" >&2; exit 2; fi
STAMP=$(date -u +%Y%m%d-%H%M%S)
RES=bench/results/gpu_session_${DEV}_${STAMP}
mkdir -p "$RES"
export OMP_NUM_THREADS=4 RAY_USAGE_STATS_ENABLED=0 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  { echo "# command: $*"; echo "# device: $DEV; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
    echo "# started: $(date -u +%FT%TZ), limit ${limit}s"; } > "$RES/$name.txt"
  timeout "$limit" "$@" >> "$RES/$name.txt" 2>&1
  echo "# exit: $? at $(date -u +%FT%TZ)" >> "$RES/$name.txt"
  tail -n 4 "$RES/$name.txt"
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/$RES" && cp "$RES/$name.txt" "$OUT/$RES/"; fi
}

nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
# Correctness first: the CUDA tests of tests/test_packed.py (auto step options = fp32 eager,
# no device sync in a graphed step, resume of a graphed pack) and the CPU ones beside them.
stage tests 60 "$PY" -m pytest tests/test_packed.py tests/test_trial.py -q -x
stage throughput_256 180 "$PY" bench/throughput.py --device cuda --size 256 --net reference --steps 30 --check-iterations 600
stage throughput_512 150 "$PY" bench/throughput.py --device cuda --size 512 --net reference --steps 20 --ks 1 2 4 8 16
# The study stage without Ray, Optuna or MLflow (the GPU image has none of them): `train` runs
# with repeats over the configurations a short study would try, every input mode at 256 px,
# 300 iterations, 2 repeats (seeds) each, the honest final, autostop and oracle numbers.
for mode in uniform gaussian gaussian_resample ddpm ddpm_resample ddpm_random_t; do
  stage "train_$mode" 60 "$PY" run_study.py train --noise-mode "$mode" --timestep 100 --size 256 \
    --iterations 300 --report-every 50 --repeats 2 --window 50 --patience 100 --quiet \
    --out "$RES/train_$mode"
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], *(f'{k} {r[k]:.2f}' for k in ('psnr_ema','psnr_autostop','psnr_best','seconds_per_iteration')))" \
    "$RES/train_$mode/result.json" "$mode" >> "$RES/train_summary.txt" 2>&1
done
[ -n "${OUT:-}" ] && cp "$RES/train_summary.txt" "$OUT/$RES/" 2>/dev/null
echo "results in $RES"
