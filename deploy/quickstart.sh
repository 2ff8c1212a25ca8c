#!/usr/bin/env bash
# From a fresh clone: install, bring the whole stack up (Redis, Ray, gateway, vLLM CPU
# engine with SmolLM2-135M-Instruct), and send one real request through the OpenAI SDK.
# The stack keeps running afterwards; stop it with `.venv/bin/oss-serve down`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/oss-serve up --detach "$@"
.venv/bin/python - <<'PY'
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-in-local-mode")
reply = client.chat.completions.create(
    model="smollm2-135m-instruct",
    temperature=0,
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
)
print("\nQ: What is the capital of France?\nA:", reply.choices[0].message.content)
PY
