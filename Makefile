# `make demo` and `make test` each set everything up from nothing: a .venv with the package, at
# the exact versions in constraints.txt (those the suite last passed with) and build tools at
# those in build-constraints.txt. pyproject.toml keeps version ranges for people who
# `pip install` the package; `make pins` moves the pins to the newest releases those ranges
# allow, after the suite has passed on them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is the CPU build that lies on this kind of machine's disk: an unpinned `torch` may pull
# a multi-GB CUDA build.
TORCH := 2.13.0
PIN := --constraint constraints.txt --build-constraint build-constraints.txt
# llama.cpp (llama-cpp-python) for the GGUF parity tests is built from source by pip: ~3 min on
# 2 cores, cached as a wheel for later installs. Its image-model library (mtmd) is left out.
LLAMA_CPP_BUILD := CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc)

.PHONY: demo test install bench gpu-check pins clean

$(VENV)/.installed: pyproject.toml constraints.txt build-constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# First pip itself: the venv's own may be too old for --build-constraint.
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIN) "torch==$(TORCH)"
	$(BIN)/python -m pip install --quiet $(PIN) -e ".[dev]"
	touch $@

$(VENV)/.installed-llamacpp: $(VENV)/.installed
	$(LLAMA_CPP_BUILD) $(BIN)/python -m pip install --quiet $(PIN) -e ".[dev,llamacpp]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/babyllama demo

test: $(VENV)/.installed-llamacpp
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/train_throughput.py

# One GPU session's checks and measurements (precisions, MFU, memory, packed SFT attention,
# decoding, QLoRA, torchrun DDP/FSDP, the demo) as one README table; ~8 minutes on an H200.
# `python benchmarks/gpu_check.py --dry-run` runs the same code on CPU in under a minute.
gpu-check: $(VENV)/.installed
	$(BIN)/python benchmarks/gpu_check.py

# A fresh venv with the newest releases pyproject.toml allows, the whole suite on it, and only
# if it passes, its versions written to constraints.txt and build-constraints.txt.
pins:
	rm -rf .venv-pins
	$(PY) -m venv .venv-pins
	.venv-pins/bin/python -m pip install --quiet --upgrade pip setuptools
	.venv-pins/bin/python -m pip install --quiet "torch==$(TORCH)"
	$(LLAMA_CPP_BUILD) .venv-pins/bin/python -m pip install --quiet -e ".[dev,llamacpp]"
	.venv-pins/bin/python -m pytest -q tests
	{ echo "# Exact versions \`make test\` passed with (written by \`make pins\`)."; \
	  .venv-pins/bin/python -m pip freeze --all --exclude-editable; } > constraints.txt
	.venv-pins/bin/python -m venv --clear .venv-pins
	.venv-pins/bin/python -m pip install --quiet --upgrade pip
	.venv-pins/bin/python -m pip install --quiet --upgrade setuptools "scikit-build-core[pyproject]"
	{ echo "# Build backends of the package and of llama-cpp-python (written by \`make pins\`)."; \
	  .venv-pins/bin/python -m pip freeze --all | grep -v "^pip=="; } > build-constraints.txt
	rm -rf .venv-pins

clean:
	rm -rf $(VENV) .venv-pins runs .pytest_cache
