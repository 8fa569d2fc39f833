# Two entry points: `make demo` and `make test`. Each creates .venv if needed, installs torch 2.13.0
# (the CPU build; an unpinned torch pulls a multi-GB CUDA build) when none is importable, then the project.
# `make test-timm` (not part of `make test`) builds a second environment, .venv-timm, with PyPI's torch,
# torchvision and timm (tests_timm/constraints.txt; about 5.7 GB) and runs tests_timm/ on real timm models.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VENV_TIMM ?= .venv-timm
TIMM_BIN := $(VENV_TIMM)/bin

.PHONY: demo test test-all test-timm lint install clean

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

# `make test`: lint and the quick tests (a few minutes on 2 cores); `make test-all`: the rest (real models
# over many images, torchrun, torch.compile, fine-tuning). CI runs both.
SLOW := heavy or slow or compile

test: $(BIN)/.installed
	$(BIN)/ruff check src tests tests_timm benchmarks
	$(BIN)/python -m pytest -q -m "not ($(SLOW))"

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "$(SLOW)"

# The project's torch<2.14 bound would make pip swap torch 2.14.1 for an older build, so the project goes
# in with --no-deps after its other runtime dependencies (tests_timm/project_deps.py reads them).
$(TIMM_BIN)/.installed: pyproject.toml tests_timm/constraints.txt
	test -x $(TIMM_BIN)/python || $(PYTHON) -m venv $(VENV_TIMM)
	$(TIMM_BIN)/python tests_timm/project_deps.py > $(VENV_TIMM)/project-deps.txt
	$(TIMM_BIN)/pip install --quiet -c tests_timm/constraints.txt torch torchvision timm 'pytest>=7' \
		-r $(VENV_TIMM)/project-deps.txt
	$(TIMM_BIN)/pip install --quiet --no-deps -e .
	$(TIMM_BIN)/python -c "import timm, torch, torchvision, renyiprune; print('timm', timm.__version__, 'torch', torch.__version__)"
	touch $@

test-timm: $(TIMM_BIN)/.installed
	$(TIMM_BIN)/python -m pytest -q tests_timm

clean:
	rm -rf $(VENV) $(VENV_TIMM) .pytest_cache .ruff_cache
