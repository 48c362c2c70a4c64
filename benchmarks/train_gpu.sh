#!/usr/bin/env bash
# GPU figures of the twin (issue 5): twin-splat against stock splatfacto on the same export.
#
# Here, on the CPU machine:
#   .venv/bin/python benchmarks/train_gpu_prep.py        # -> .data/ring24 (640x480, ~8 MiB)
#   cp -r ../shared/gpu-kit .gpukit                      # nerfstudio 1.1.5 + gsplat 1.4.0 for the GPU machine
# On the GPU machine (the device tool):  run  bash benchmarks/train_gpu.sh  carrying .gpukit and .data
#
# Both methods train ITERS steps with nerfstudio's own trainer (ns_offline = ns-train without network),
# saving a checkpoint every EVERY steps; nvidia-smi samples the GPU memory. benchmarks/train_gpu_eval.py
# then scores every checkpoint of both on the held-out cameras the same way (ground truth composited with
# the subject mask onto the render's background; and the subject's pixels alone), which gives PSNR over
# time and the minutes to 30 dB. Results (logs, eval.json per method, summary) go to $OUT.
set -euo pipefail
ITERS=${ITERS:-7000}
EVERY=${EVERY:-1000}
DATA=${DATA:-.data/ring24}
RESULTS=${OUT:-./gpu_results}
SITE=${SITE:-/tmp/site}
RUNS=${RUNS:-/tmp/ns_runs}
mkdir -p "$RESULTS"
bash .gpukit/install.sh "$SITE" >/dev/null
# no TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: train_gpu_eval.py loads checkpoints with weights_only=True (train.config)
export PYTHONPATH="$SITE:$(pwd)" PYTHONUNBUFFERED=1
export NERFSTUDIO_METHOD_CONFIGS="twin-splat=train.config:twin_splat"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RESULTS/gpu.txt"
for METHOD in twin-splat splatfacto; do
  # twin-splat brings its own dataparser (studio frame, lighting presets); splatfacto reads nerfstudio-data
  if [ "$METHOD" = splatfacto ]; then DP="nerfstudio-data --load-3D-points True --downscale-factor 1"; else DP=""; fi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$RESULTS/$METHOD.mem" &
  SMI=$!
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  python3 -m ns_offline train "$METHOD" --data "$DATA" --output-dir "$RUNS" --experiment-name ring24 \
    --timestamp run --max-num-iterations "$ITERS" --vis tensorboard --viewer.quit-on-train-completion True \
    --steps-per-eval-batch 0 --steps-per-eval-image 0 --steps-per-eval-all-images 0 \
    --steps-per-save "$EVERY" --save-only-latest-checkpoint False --machine.seed 42 \
    $DP >"$RESULTS/$METHOD.train.log" 2>&1 || { kill $SMI; tail -n 40 "$RESULTS/$METHOD.train.log"; exit 1; }
  t1=$(date +%s.%N)
  kill $SMI
  peak=$(sort -n "$RESULTS/$METHOD.mem" | tail -1)
  wall=$(python3 -c "print(round($t1 - $t0, 1))")
  echo "$METHOD train_wall_s $wall iterations $ITERS peak_gpu_mem_mib $peak" | tee -a "$RESULTS/summary.txt"
done
python3 benchmarks/train_gpu_eval.py "$RUNS/ring24" "$RESULTS" | tee -a "$RESULTS/summary.txt"
