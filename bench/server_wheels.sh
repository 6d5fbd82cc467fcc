#!/usr/bin/env bash
# Downloads the server's pure-Python dependencies (and pydantic-core) as wheels for a Linux x86-64 CPython of
# the given version, for a GPU machine that has torch but no network:
#   bash bench/server_wheels.sh DIR [PYTHON_VERSION]     then there: pip install --no-index --no-deps DIR/*.whl
# The versions are those installed here, so both sides run the same server.
set -euo pipefail
dir=${1:?usage: bash bench/server_wheels.sh DIR [PYTHON_VERSION]} py=${2:-3.12}
packages=$(python3 -m pip list --format=freeze 2>/dev/null | tr '_' '-' | grep -i -E \
  '^(fastapi|starlette|uvicorn|sse-starlette|prometheus-client|pydantic|pydantic-core|annotated-types|annotated-doc|typing-inspection|typing-extensions|anyio|sniffio|h11|httptools|click|httpx|httpcore|certifi|idna|opentelemetry-api|importlib-metadata|zipp)==')
python3 -m pip download -q -d "$dir" --only-binary=:all: --no-deps --python-version "$py" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 $packages
ls "$dir"
