#!/usr/bin/env bash
# One prepared GPU run (under 8 minutes on one H200): installs the gpu extra if needed, then measures
# ViT-B-32 and tiny encode throughput (tensors and full pipeline) and FAISS GPU search at 1M and 10M,
# then the real-size models (ViT-B-32 indexing / bare encode, mid over its tokens, BLIP base) on the GPU.
# Writes bench/results/gpu.json and real_models_gpu.json (or under $OUT when OUT is set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[gpu]'; PY=.venv/bin/python; }
"$PY" -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') else 1)" \
  || "$PY" -m pip install -q 'faiss-gpu-cu12>=1.8' || echo "faiss-gpu unavailable: FAISS figures will be CPU"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 400 "$PY" bench/gpu.py --device cuda --out "${OUT:-bench/results}/gpu.json"
timeout 120 "$PY" bench/real_models.py --device cuda --n 1024 --rounds 1 --out "${OUT:-bench/results}/real_models_gpu.json"
