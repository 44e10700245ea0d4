#!/usr/bin/env bash
# Wheels for running this checkout on a GPU machine that has CUDA torch but no package registry
# (an offline cluster node; this workplace's device machine):
#   bash experiments/offline_wheels.sh [DIR]          # default .whl (ignore it in git)
# then, there, from the checkout:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site:$PWD      # the checkout runs uninstalled (its version: pyproject.toml)
#   printf '#!/bin/sh\nexec python3 -m gist_lightning.cli "$@"\n' > /tmp/site/gist-lightning  # + chmod +x, PATH
# Each package is taken at the version installed here (`make install`), for CPython 3.12 on
# x86-64 Linux (PYTHON_VERSION to change it), without dependencies (--no-deps): the list below is
# what an image with torch, lightning, peft, numpy, pandas, pyarrow and the usual tools lacked
# (measured on an H200 image with torch 2.11, 2026-12-04). rouge-score and deepspeed are sdists:
# built here into pure-Python wheels (deepspeed builds its ops at run time). bitsandbytes is left
# out: its wheel is larger than the 64 MiB such a call could carry; QLoRA needs it installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
BINARY=(transformers huggingface_hub hf-xet kernels tokenizers jsonargparse docstring_parser typeshed_client
        datasets dill multiprocess nltk regex litserve fastapi starlette uvicorn pydantic pydantic_core
        annotated-types typing-inspection typing_extensions opentelemetry-api pyzmq defusedxml hjson
        httpx2 httpcore2 click tomlkit truststore idna)
SOURCE=(rouge-score deepspeed)
pinned() {  # NAME==VERSION as installed here
  local version
  version=$("$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}')
  [[ -n $version ]] || { echo "offline_wheels.sh: $1 is not installed in $PY (run make install)" >&2; exit 1; }
  echo "$1==$version"
}
WANT=()
for name in "${BINARY[@]}"; do WANT+=("$(pinned "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" "${WANT[@]}"
WANT=()
for name in "${SOURCE[@]}"; do WANT+=("$(pinned "$name")"); done
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "${WANT[@]}"
du -sh "$DIR"
