PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# A .venv whose Python no longer runs (its interpreter removed), or of
# another Python version than $(PYTHON), is made anew (removed as the
# Makefile is read, so by `make -n` too).
VERSION_OF = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifneq ($(wildcard $(VENV)),)
VENV_VERSION := $(call VERSION_OF,$(BIN)/python)
WANTED_VERSION := $(call VERSION_OF,$(PYTHON))
ifeq ($(VENV_VERSION),)
$(info $(VENV) is broken (its python does not run): making it anew)
$(shell rm -rf $(VENV))
else ifneq ($(WANTED_VERSION),$(if $(WANTED_VERSION),$(VENV_VERSION)))
$(info $(VENV) has Python $(VENV_VERSION), $(PYTHON) is $(WANTED_VERSION): making it anew)
$(shell rm -rf $(VENV))
endif
endif

.PHONY: demo test docs clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	@# The native kernels, compiled once (about 25 s); without a C++ compiler
	@# the package runs on TensorFlow ops and says so.
	$(BIN)/python -c 'from keras_condcomp.ops import build_native_kernels as b; b()' \
		|| echo "keras_condcomp: native kernels not built (no working C++ compiler?): slower inference"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/keras-condcomp train --dataset digits --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site .pytest_cache
