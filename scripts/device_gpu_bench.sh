#!/usr/bin/env bash
# The GPU figures of docs/scaling.md on a lent GPU machine (PyTorch and transformers there; no
# Ray, no registry): `all` (default) the sizes, batches and precisions; `where` where base's
# time goes (TF32, cuDNN autotuning, device time by kernel kind). The packages the machine
# lacks travel as wheels in .whl (docs/scaling.md says which). JSON lines and logs go to $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
bench="python3 -m benchmarks.gpu_throughput"
if [ "${1:-all}" = all ]; then
  # 1. The cluster config (24 kHz, 5 s windows; what the scaling study assumes), base + small.
  timeout 240 $bench --sizes base small --train-batches 8 32 128 256 \
    --out "$OUT/gpu_cluster.jsonl" 2>&1 | tee "$OUT/log_cluster.txt"
  # 2. The shipped recipe's audio (16 kHz, 4 s windows) at each size.
  timeout 150 $bench --config configs/shipped-asap.yaml --sizes tiny small base --segments 128 \
    --out "$OUT/gpu_recipe.jsonl" 2>&1 | tee "$OUT/log_recipe.txt"
  # 3. torch.compile of base's bf16 forward at the cluster config.
  timeout 200 $bench --sizes base --skip pretrain --embed-batches 256 --compile \
    --out "$OUT/gpu_compile.jsonl" 2>&1 | tee "$OUT/log_compile.txt"
else
  # Where base's time goes, and the positional conv in float32 against under bf16 autocast.
  timeout 200 $bench --sizes base --train-batches 128 --embed-batches 256 --embed-precisions \
    bf16-autocast --pos-conv both --profile --repeats 6 --out "$OUT/gpu_where.jsonl" 2>&1 \
    | tee "$OUT/log_where.txt"
fi
grep -h '^{' "$OUT"/gpu_*.jsonl | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    keys = ('figure','what','size','sample_rate','precision','tf32','pos_conv','batch','step_s_median','samples_per_s','model_segments_per_s','compiled_segments_per_s','mfu_datasheet','recall_at_10_vs_float32','matmul_bf16_tflops','device_ms_per_call','shares','peak_memory_gib','error')
    print(' '.join(f'{k}={r[k]}' for k in keys if k in r))
"
