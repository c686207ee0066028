# Two commands a newcomer needs: `make demo` (the main job on the tiny backbone, CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# The CPU build of torch; on a GPU box: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) demo.py

# every test but the real-scale builds (under 20 minutes on 2 cores); CI (.ci/run) runs test, then test-slow
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

.PHONY: install demo test test-slow
