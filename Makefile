# Set-up and checks. `make test` and `make demo` install what they need into the current Python.
PY ?= python3
# torch and torchvision: the versions the tests ran with. They are installed only where `import torch`
# fails; then pip fetches them from PyPI, which on Linux x86_64 means the CUDA build (about 6.6 GB with its
# nvidia-* wheels; pip shows its progress). A torch of your own is kept: install your CUDA build, or the CPU
# one (pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu), before `make`.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out
PIP = $(PY) -m pip install --disable-pip-version-check
# First run: say what is coming and let pip show progress; later runs: quiet.
NEED_TORCH = $(PY) -c "import torch, torchvision" 2>/dev/null || { \
	echo "Installing $(TORCH_PINS) (first run only: about 6.6 GB for the CUDA build, several minutes)"; \
	$(PIP) $(TORCH_PINS); }
NEED_DEPS = $(PY) -c "import dali_pipes, nvidia.dali, timm, bson, simplejpeg, crc32c, yaml, tensorboard" 2>/dev/null \
	&& QUIET=-q || echo "Installing this project and its dependencies (first run only: DALI alone is several hundred MB)"

# The OCR extra (tools.ocr): `ocr` brings onnxruntime, `ocr-gpu` onnxruntime-gpu (never both: where
# onnxruntime-gpu is installed already, ocr-gpu is chosen). rapidocr-onnxruntime itself goes in with --no-deps
# so that its GUI opencv-python (libGL) stays out: setup.py's extras list the rest, with the headless OpenCV.
OCR_EXTRA ?= $(shell $(PY) -m pip show -q onnxruntime-gpu >/dev/null 2>&1 && echo ocr-gpu || echo ocr)
OCR_PIN ?= rapidocr-onnxruntime==1.4.4
NEED_OCR = if $(PY) -c "import sys; sys.exit(sys.version_info < (3, 13))"; then \
	echo "OCR extra not installed: $(OCR_PIN) needs Python < 3.13 (tools.ocr and its tests are skipped)"; \
	else $(PIP) $${QUIET:-} --no-deps $(OCR_PIN); fi

# The window decoder (dali_pipes/native: the dali-cpu loader's JPEG decoder, a DALI operator of this project)
# is built with g++ and libjpeg's headers (Debian/Ubuntu: apt-get install g++ libjpeg-dev), about 8 s. Where it
# cannot be built the loader runs DALI's own decoder instead and says why; so does this line.
NATIVE = $(PY) -m dali_pipes.native || echo "(the dali-cpu loader will use DALI's decoder: see the line above)"

.PHONY: install install-dev install-ocr test demo clean docker-test

install:
	@$(NEED_TORCH)
	@$(NEED_DEPS); $(PIP) $${QUIET:-} -e . && $(NATIVE)

install-dev:
	@$(NEED_TORCH)
	@$(NEED_DEPS); $(PIP) $${QUIET:-} -e '.[dev,$(OCR_EXTRA)]' && $(NEED_OCR) && $(NATIVE)

install-ocr:
	@$(NEED_TORCH)
	@$(NEED_DEPS); $(PIP) $${QUIET:-} -e '.[$(OCR_EXTRA)]' && $(NEED_OCR) && $(NATIVE)

test: install-dev
	$(PY) -m pytest -q tests

demo: install-dev
	@bash tools/demo.sh $(DEMO_DIR)

# docker/Dockerfile built for real and run (root, apt and network; about 7 GB of disk while it runs, removed
# after): exit 0 passed, 1 failed, 77 not run here (no Docker engine/debootstrap to be had). See docker/README.md.
docker-test:
	@bash docker/test.sh

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info dali_pipes/native/build
