#!/usr/bin/env bash
# All single-GPU benchmarks in one device call (run from the repo root; logs to $OUT when set).
set -u
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:plugins/vision_eva:plugins/bridge_qformer:plugins/llm_qwen:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout ${T_TRAIN:-280} python3 bench/train_throughput.py 2>&1 | tee "$OUT/train.log" | grep -v Warning
[ "${SKIP_DECODE:-0}" = 1 ] || timeout ${T_DECODE:-200} python3 bench/decode_latency.py 2>&1 | tee "$OUT/decode.log" | grep -v Warning
[ "${SKIP_EVA:-0}" = 1 ] || timeout ${T_EVA:-90} python3 bench/eva_forward.py 2>&1 | tee "$OUT/eva.log"
cp bench/results/*.json "$OUT/" 2>/dev/null
tail -n 8 "$OUT/train.log"; tail -n 8 "$OUT/decode.log"; tail -n 12 "$OUT/eva.log"
