# Two commands for a new user: `make demo` and `make test`. Both build .venv on first use;
# the demo needs only the runtime packages, the tests add the PyTorch references.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-train clean

$(RUNTIME): setup.py
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

# Two workers, one test file each at a time: the suite is dominated by single-threaded XLA compiles.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(RUNTIME)
	$(VENV)/bin/diffrestorer-demo

# Recreate demo/checkpoint from scratch (prior_vae -> prior_unet -> stage1 -> stage2); see demo/README.md.
demo-train: $(RUNTIME)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" launch/demo_train.sh

clean:
	rm -rf $(VENV) demo_out
