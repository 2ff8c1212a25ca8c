#!/usr/bin/env bash
# The validation table of loadtest/README.md, reproduced: start vLLM CPU with SmolLM2-135M,
# calibrate once with the default design, then validate the shipped set (without the
# gpt-oss-tiny reasoning-effort mix, which needs its own engine) against it.
#
#   bash bench/loadtest_validation.sh [OUT_DIR]     (default results/validation)
#
# Nothing else should run on the machine meanwhile (vLLM CPU workers and tests perturb the
# steps the calibration measures). Takes about an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/validation}
PORT=${PORT:-8201}
MODEL_DIR=${MODEL_DIR:-$HOME/.cache/oss-serving/models/smollm2-135m-instruct}
V=.venv/bin
mkdir -p "$OUT"
URL=http://127.0.0.1:$PORT

HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind \
    "$V/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name smollm2 \
    --port "$PORT" --max-num-seqs 32 --max-model-len 2048 --dtype float32 \
    --enable-prompt-tokens-details >"$OUT/engine.log" 2>&1 &
ENGINE=$!
trap 'kill $ENGINE 2>/dev/null; wait $ENGINE 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "$URL/health" >/dev/null && break
    kill -0 $ENGINE 2>/dev/null || { tail -30 "$OUT/engine.log"; exit 1; }
    sleep 1
done

cat >"$OUT/val.yaml" <<'EOF'
sweep: {min_requests: 16, stop_after_saturated: 2}
load: {drain_timeout_s: 120}
target: {request_timeout_s: 300}
EOF
COMMON=(--base-url "$URL" --model smollm2 --tokenizer "hf:$MODEL_DIR" --scrape "$URL/metrics")

"$V/oss-loadtest" calibrate "${COMMON[@]}" --max-num-seqs 32 \
    --out "$OUT/cal" --profile-out "$OUT/smollm2-cpu.yaml"
"$V/oss-loadtest" validate --config "$OUT/val.yaml" "${COMMON[@]}" --profile "$OUT/smollm2-cpu.yaml" \
    --start-fraction 0.25 --factor 2 --max-points 6 --point-duration 20 \
    --only prefill-heavy --only decode-heavy --only mixed-length --only shared-prefix --only multi-turn \
    --out "$OUT/val"
