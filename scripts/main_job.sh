#!/usr/bin/env bash
# The main job on the embedded default (CPU, about 15 minutes): train a multi-task translator on the shapes
# world against the shipped teacher, export it to checkpoints/, translate sample inputs, write a before/after
# grid and print the metrics table. Extra arguments are Hydra overrides of the training run.
set -euo pipefail
out=${OUT_DIR:-outputs/main}
translator=${TRANSLATOR_DIR:-checkpoints/shapes-translator}
export WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$out"

echo "== 1/4 train (experiment=shapes) -> $out/train"
ddstrans-train experiment=shapes logger=csv_wandb hydra.run.dir="$out/train" export_after_fit=false "$@"

echo "== 2/4 export -> $translator"
ddstrans export "$out/train/checkpoints/last.ckpt" "$translator" --overwrite

echo "== 3/4 translate held-out renders -> $out/translated"
python scripts/render_shapes.py "$out/inputs" --n 8
for task in to_blue to_square to_checkered; do
  ddstrans translate "$translator" --task "$task" "$out"/inputs/*.png -o "$out/translated/$task" --overwrite
done

echo "== 4/4 evaluate (64 held-out inputs per task) -> $out/eval.json, $out/before_after.png"
ddstrans eval "$translator" --methods identity,network --n 64 --json "$out/eval.json" --grid "$out/before_after.png"
ddstrans card "$translator" --eval "$out/eval.json"

echo "== done"
echo "try it in a browser: ddstrans demo $translator   (http://127.0.0.1:7860)"
echo "validation metrics during training (val/<task>/target_acc, mask_iou, keep_psnr, diversity): $out/train/csv/version_*/metrics.csv"
for run in "$out"/train/wandb/offline-run-*; do
  [ -d "$run" ] && echo "wandb offline run (grids + metrics; upload with: wandb sync $run)"
done
