# Two commands for a new user: `make test` and `make demo`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-train clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The LPIPS parity reference; --no-deps because its torchvision requirement does not import
	# beside the CPU torch wheel (the test supplies the few torchvision pieces lpips needs).
	$(PY) -m pip install --quiet --no-deps lpips==0.1.4
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) launch/demo.py

# Recreate demo/checkpoint from scratch (prior_vae -> prior_unet -> stage1 -> stage2); see demo/README.md.
demo-train: $(STAMP)
	PY=$(PY) launch/demo_train.sh

clean:
	rm -rf $(VENV) demo_out
