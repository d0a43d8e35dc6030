# Two commands for a new user: `make demo` and `make test`. Both build .venv on first use;
# the demo needs only the runtime packages, the tests add the PyTorch references.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
# The CUDA PJRT plugin for compiling GPU programs on this CPU host (diffrestorer-aot --topology h100x8),
# kept in a folder of its own, outside the venv's site-packages: installed there, every JAX process
# would log that CUDA is missing. Use it with PYTHONPATH=$(GPU_AOT) JAX_PLATFORMS=cpu.
GPU_AOT := $(VENV)/gpu_aot

.PHONY: install test demo demo-train app browser gpu-aot clean

$(RUNTIME): setup.py
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "$(PYTHON) is $$($(PYTHON) -V 2>&1); diffrestorer_jax needs Python >= 3.11 (make PYTHON=python3.11 ...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install --quiet -e '.[test]'
	# The LPIPS and FID Inception parity references; --no-deps because their torchvision requirement
	# does not import beside the CPU torch wheel (test_lpips supplies the few torchvision pieces lpips
	# needs; test_fid_inception imports torch-fidelity's pure-torch Inception module on its own).
	$(PY) -m pip install --quiet --no-deps lpips==0.1.4 torch-fidelity==0.4.0
	touch $(STAMP)

install: $(STAMP)

# The plugin must match the installed jax exactly; ptxas comes from nvidia-cuda-nvcc-cu12. Linux only
# (no wheels elsewhere): when it cannot be installed, the GPU compile test skips and says why.
gpu-aot: $(RUNTIME)
	@test -f $(GPU_AOT)/.installed || { \
	  v=$$($(PY) -c 'import jax; print(jax.__version__)'); \
	  $(PY) -m pip install --quiet --no-deps --target $(GPU_AOT) "jax-cuda12-plugin==$$v" \
	    "jax-cuda12-pjrt==$$v" "nvidia-cuda-nvcc-cu12<13" "nvidia-cuda-runtime-cu12<13" \
	  && touch $(GPU_AOT)/.installed \
	  || echo "could not install the CUDA PJRT plugin; the GPU compile test will skip"; }

# The web app's browser test drives Debian's Chromium through chromium-driver. Installed here when
# missing and we are root with apt-get; otherwise that test skips and says why.
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium + chromium-driver for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
	    || echo "could not install chromium; tests/test_app_browser.py will skip"; \
	fi

# Two workers, one test file each at a time: the suite is dominated by single-threaded XLA compiles.
test: $(STAMP) browser gpu-aot
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(RUNTIME)
	$(VENV)/bin/diffrestorer-demo

# The web app on the shipped demo checkpoint: http://127.0.0.1:7860/ (PORT=... to change). The tiny
# model compiles ~2x faster without LLVM's optimisations (diffrestorer-demo, which restores 18 photos of
# 128 px, runs at -O1 instead: there the run time outweighs the compile).
PORT ?= 7860
app: $(RUNTIME)
	XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS" $(VENV)/bin/diffrestorer-app --checkpoint demo/checkpoint --port $(PORT)

# Recreate demo/checkpoint from scratch (prior_vae -> prior_unet -> stage1 -> stage2 -> stage2_whole,
# the export averaging the last two decoders); see demo/README.md.
demo-train: $(RUNTIME)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" launch/demo_train.sh

clean:
	rm -rf $(VENV) demo_out
