# Two entry points: `make demo` and `make test`. Each creates .venv if needed, installs torch 2.13.0
# (the CPU build; an unpinned torch pulls a multi-GB CUDA build) when none is importable, then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/renyiprune eval --model deit_tiny_patch16_224 \
		--weights demo/weights/deit_tiny_patch16_224.safetensors --data demo/imagenet-100 \
		--criterion none,evit,renyi --alpha 1,2,inf --keep 0.7

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
