# posattn developer tasks (GNU make).
#
#   make venv    create .venv and install torch + the package with test extras
#   make test    run the test suite on TEST_WORKERS processes (pytest-xdist; default: one per
#                core, 0 runs it in this process); PYTEST_ARGS="..." adds pytest arguments
#   make demo    run bench/train_demo.py (train a tiny LM with each encoding; accuracy by length)
#   make check   run bench/demo.py (each encoding vs the reference: errors and timings)
#   make bench   run bench/run.py (peer benchmark on a GPU; a CPU smoke run without one)
#   make gpu     on a lent GPU machine (no network): bench/gpu_check.py with $(PYTHON) itself, no venv:
#                install -e ., the CUDA build, the kernel tests (xdist), compute-sanitizer, the quick
#                benchmark, in under 9 min; results in $(GPU_OUT)/gpu_<device>_<date>/ (GPU_OUT=dir,
#                default bench/results). DRY_RUN=1 prints the plan and checks it (no GPU needed);
#                GPU_COMMIT=<sha> records the commit where the tree has no .git; GPU_ARGS adds
#                arguments (e.g. GPU_ARGS="--steps install,bench").
#   make clean   remove build and cache outputs (distclean also removes .venv)
#
# With no NVIDIA GPU (`nvidia-smi -L` fails or is missing), TRITON_INTERPRET=1
# is exported so the Triton kernels run under Triton's CPU interpreter.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
TEST_WORKERS ?= auto
GPU_OUT ?=
GPU_COMMIT ?=
GPU_ARGS ?=
DRY_RUN ?=

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

# GPU detection without importing torch.
HAVE_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAVE_NVIDIA_GPU),)
export TRITON_INTERPRET ?= 1
endif

.PHONY: venv test demo check bench gpu clean distclean

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
	$(VPY) -m pytest tests -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

demo: $(STAMP)
	@echo "TRITON_INTERPRET=$${TRITON_INTERPRET:-<unset>}"
	$(VPY) bench/train_demo.py

check: $(STAMP)
	@echo "TRITON_INTERPRET=$${TRITON_INTERPRET:-<unset>}"
	$(VPY) bench/demo.py

bench: venv
	@echo "TRITON_INTERPRET=$${TRITON_INTERPRET:-<unset>}"
	$(VPY) bench/run.py

# No venv and no TRITON_INTERPRET: gpu_check.py removes it from every step's environment.
gpu:
	$(PYTHON) bench/gpu_check.py $(if $(filter-out 0,$(DRY_RUN)),--dry-run) \
		$(if $(GPU_OUT),--out "$(GPU_OUT)") $(if $(GPU_COMMIT),--commit "$(GPU_COMMIT)") $(GPU_ARGS)

clean:
	rm -rf build dist .pytest_cache .hypothesis .benchmarks
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -prune -exec rm -rf {} + -o \
		-name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
