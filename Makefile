# posattn developer tasks (GNU make).
#
#   make venv    create .venv and install torch + the package with test extras
#   make test    run the test suite (PYTEST_ARGS="..." adds pytest arguments)
#   make demo    run bench/train_demo.py (train a tiny LM with each encoding; accuracy by length)
#   make check   run bench/demo.py (each encoding vs the reference: errors and timings)
#   make bench   run bench/run.py (peer benchmark on a GPU; a CPU smoke run without one)
#   make clean   remove build and cache outputs (distclean also removes .venv)
#
# With no NVIDIA GPU (`nvidia-smi -L` fails or is missing), TRITON_INTERPRET=1
# is exported so the Triton kernels run under Triton's CPU interpreter.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

# GPU detection without importing torch.
HAVE_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAVE_NVIDIA_GPU),)
export TRITON_INTERPRET ?= 1
endif

.PHONY: venv test demo check bench clean distclean

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the version whose CPU wheel pip finds locally
# (find-links), so that resolving the package's "torch>=2.4" installs nothing
# more; then the package itself, editable, with its test extras.
$(STAMP): pyproject.toml setup.py | $(VPY)
	$(VPY) -m pip install "torch==$(TORCH_VERSION)"
	$(VPY) -m pip install -e ".[test]"
	touch $@

test: $(STAMP)
	@echo "TRITON_INTERPRET=$${TRITON_INTERPRET:-<unset>}"
	$(VPY) -m pytest tests -q $(PYTEST_ARGS)

demo: $(STAMP)
	@echo "TRITON_INTERPRET=$${TRITON_INTERPRET:-<unset>}"
	$(VPY) bench/train_demo.py

check: $(STAMP)
	@echo "TRITON_INTERPRET=$${TRITON_INTERPRET:-<unset>}"
	$(VPY) bench/demo.py

bench: venv
	@echo "TRITON_INTERPRET=$${TRITON_INTERPRET:-<unset>}"
	$(VPY) bench/run.py

clean:
	rm -rf build dist .pytest_cache .hypothesis .benchmarks
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -prune -exec rm -rf {} + -o \
		-name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
