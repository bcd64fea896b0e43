#!/usr/bin/env bash
# GPU check in ONE short call (< 8 min) on a lent H100 (bf16): the training-step benchmark (1), the
# memory sweep, the optimisation ablations and the translation benchmark (4), all with --arch sd15 (random
# Stable-Diffusion-1.5-shaped teacher and generator at 64x64 latents). Tables go to $OUT/ (set by the device tool;
# ./gpu_out otherwise). Record the results in docs/performance.md ("GPU" section).
#
# Preparation HERE (once; the device machine has no network and its image lacks diffusers):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# Then, through the device tool:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The image's own python3 (PyTorch with CUDA, lightning, transformers, safetensors) is used; ddstrans is put on
# PYTHONPATH from this checkout (no install). Each step has its own time limit, so one slow step cannot eat the
# others' time; a step that fails or times out is reported and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export DDSTRANS_CACHE=/tmp/ddstrans-cache

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, lightning, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'lightning', lightning.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
'gpu', torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"
$PY -c "import diffusers, ddstrans.module" 2>/dev/null || { echo "missing packages (diffusers? see the preparation above)" | tee -a "$OUT/env.txt"; exit 2; }

step() {  # step <name> <seconds> <command...>: stdout -> $OUT/<name>.md, stderr -> $OUT/<name>.err
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$secs" "$@" >"$OUT/$name.md" 2>"$OUT/$name.err"
  local rc=$?
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/env.txt"
  tail -n 25 "$OUT/$name.md"
  [ $rc -eq 0 ] || tail -n 20 "$OUT/$name.err"
}

# (1) training step a/b/c/d, SD-1.5 shapes, bf16-mixed, batch 4, cached latents, generator with gradient checkpointing
step train_step 150 $PY scripts/bench_train_step.py --arch sd15 --device cuda --dtype bf16 --batch 4 --steps 15 --warmup 3 \
  --json "$OUT/train_step.json"
# (4) single pass vs 200-step DDS editing, batch 1 and 8, 512 px
step translate 100 $PY scripts/bench_translate.py --arch sd15 --device cuda --dtype bf16 --batch 8 --rounds 3 \
  --json "$OUT/translate.json"
# memory vs batch (each batch size in a fresh process: cuda max_memory_allocated per phase)
step memory_sweep 90 $PY scripts/bench_train_step.py --arch sd15 --device cuda --dtype bf16 --memory-sweep 1,2,4 \
  --sweep-steps 3 --batch 1 --steps 3 --warmup 1
# optimisation ablations on the GPU: inference_mode, bf16/fp16 vs fp32 teacher, SDPA vs classic attention,
# channels_last, prompt cache, cached latents (SD VAE at 512 px), gradient checkpointing, module per-step costs
step ablations 90 $PY scripts/bench_train_step.py --arch sd15 --device cuda --dtype bf16 --batch 4 --ablations --quick \
  --steps 0 --json "$OUT/ablations.json"
# scale: peak memory of real DDS steps on a random full-size SD-1.5 teacher (LoRA vs full generator, savers), next
# to the memory model's prediction (docs/performance.md, "Memory at full size"). trainer=fsdp needs >= 2 GPUs:
# with several, add  ddstrans-train experiment=sd15_cat2animals generator=from_teacher trainer=fsdp optim.ema.enabled=false
step memory_fullsize 120 $PY scripts/measure_memory.py --device cuda --resolution 512 \
  --settings lora-b1,lora-b4,full-b1
echo "[gpu_check] done in $SECONDS s; files in $OUT" | tee -a "$OUT/env.txt"
ls -la "$OUT"
