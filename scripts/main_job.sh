#!/usr/bin/env bash
# Main job (placeholder until the shapes experiment lands): zero-shot DDS edit on a tiny random teacher.
set -euo pipefail
out=${OUT_DIR:-outputs/main}
mkdir -p "$out"
python - "$out" <<'PY'
import sys, numpy as np
from PIL import Image
from ddstrans.testing import make_tiny_sd
out = sys.argv[1]
make_tiny_sd(f"{out}/tiny-teacher")
Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")).save(f"{out}/input.png")
PY
ddstrans edit "$out/input.png" --teacher "$out/tiny-teacher" --source "a photo of a cat" --target "a photo of a lion" \
  -o "$out/edited.png" --steps 20 --overwrite
