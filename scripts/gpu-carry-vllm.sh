#!/usr/bin/env bash
# Pack GPU vLLM for a machine with a PyTorch image and no package registry (the lent H100/H200:
# torch 2.11.0+cu130, transformers 5.17, Python 3.12), in parts that fit a 64 MiB transfer each:
#   bash scripts/gpu-carry-vllm.sh [OUTDIR=.gpu_carry]   ->  OUTDIR/vllm-site.tar.xz.part-aa, -ab, ...
# On the GPU machine, once all parts are there (one transfer per part):
#   mkdir -p /tmp/vllm-site && cat .gpu_carry/vllm-site.tar.xz.part-* | xz -d | tar x -C /tmp/vllm-site
#   export PYTHONPATH=/tmp/vllm-site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0
# (`bench/gpu_check.sh` does both when it finds the parts.)
#
# Why vLLM 0.26.0: the newest release built for torch 2.11 (0.27+ need torch 2.13, which the image
# lacks and which is several GB). Its wheel is 300 MB; what an offline dense/pruned Llama run on a
# Hopper GPU needs is kept: the CUDA ops (_C) and FlashAttention 3. Dropped: FlashAttention 2
# (pre-Hopper), the MoE ops, the Blackwell and FP8 GEMM kernels, the Rust frontend, and
# flashinfer (hence VLLM_USE_FLASHINFER_SAMPLER=0: vLLM 0.26's sampler imports it otherwise).
# The dependencies are those `import vllm` and an engine start needed beyond that image, found by
# importing vLLM's engine, worker, attention and model modules in a Python 3.12 venv with the
# image's torch and transformers.
set -euo pipefail
OUT=${1:-.gpu_carry}
VLLM_VERSION=0.26.0
DEPS=(annotated-types==0.8.0 apache-tvm-ffi==0.1.15.post2 blake3==1.0.11 cachetools==8.0.2
      cbor2==6.3.0 fastapi==0.136.3 httpx2==2.16.2 llguidance==1.7.6 msgspec==0.22.0
      openai==3.57.0 openai-harmony==0.0.8 partial-json-parser==0.2.1.1.post7 pybase64==1.5.1
      pydantic==2.14.4 pydantic_core==2.50.5 pyzmq==27.3.0 setproctitle==1.3.8 sniffio==1.3.1
      starlette==1.10.0 typing-inspection==0.4.5 xgrammar==0.2.8)
DROP=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so
      vllm/third_party/fmha_sm100 vllm/third_party/deep_gemm vllm/vllm-rs)

source "$(dirname "${BASH_SOURCE[0]}")/gpu-carry-lib.sh"
site="$CARRY_WORK/site"
echo "gpu-carry-vllm: downloading vllm==$VLLM_VERSION and ${#DEPS[@]} dependencies (cp312, x86_64)"
carry_unpack "$site" "vllm==$VLLM_VERSION" "${DEPS[@]}"
# The loader plugin's entry point, found on PYTHONPATH (the repository itself is not installed there).
ep="$site/tabp_vllm_plugin-0.1.0.dist-info"
mkdir -p "$ep"
printf 'Metadata-Version: 2.1\nName: tabp-vllm-plugin\nVersion: 0.1.0\n' > "$ep/METADATA"
printf '[vllm.general_plugins]\ntabp_vllm_loader = tabp_vllm.loader:register\n' > "$ep/entry_points.txt"
carry_pack "$site" "$OUT" vllm-site
