#!/usr/bin/env bash
# RecBole 1.2.1 (the SASRec baseline of scripts/sasrec_recbole.py) in a venv of its own, .venv-recbole: it needs
# numpy<2, pandas<2.3 and scipy<1.14, which the project's own environment has outgrown. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RECBOLE_VENV:-.venv-recbole}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch pinned as in requirements.txt (a plain requirement could pull a multi-GB CUDA build);
# setuptools<81: RecBole imports pkg_resources
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0 "numpy<2" "pandas<2.3" \
    "scipy<1.14" "setuptools<81" tqdm recbole==1.2.1
