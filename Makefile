# Set-up and checks. `make test` and `make demo` install what they need into the current Python.
PY ?= python3
# torch is pinned to the build this workplace ships on disk; on a GPU box, install your CUDA torch first
# (or set TORCH_PINS=) and the rest installs around it.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install install-dev test demo clean

install:
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) $(TORCH_PINS)
	@$(PIP) -e .

install-dev:
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) $(TORCH_PINS)
	@$(PIP) -e '.[dev]'

test: install-dev
	$(PY) -m pytest -q tests

demo: install-dev
	@bash tools/demo.sh $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
