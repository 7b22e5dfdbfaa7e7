# Quick start: `make demo` (edit an image with the embedded model) and `make test` (the whole
# suite). Both bootstrap a virtual environment in .venv from nothing; the CPU build of torch is
# installed first and pinned (.ci/constraints.txt) so pip never pulls a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c .ci/constraints.txt
DEMO   := out/demo

.PHONY: demo test install install-test eval bench clean

$(VENV)/.runtime: pyproject.toml .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.runtime

install-test: $(VENV)/.test

# Edit the shipped example with the embedded model: writes the edit, the mask and the panel.
demo: $(VENV)/.runtime
	@mkdir -p $(DEMO)
	$(VENV)/bin/diffedit edit weights/examples/red-circle-and-green-square.png \
		--source "a red circle and a green square on a gray background" \
		--target "a blue circle and a green square on a gray background" \
		--out $(DEMO)/edit.png --mask-out $(DEMO)/mask.png --panel-out $(DEMO)/panel.png --overwrite
	@echo "demo: the red circle becomes a blue circle; see $(DEMO)/panel.png (input | mask | edit)"

# The whole suite, slow full-size parity included. pytest's exit code 5 (no tests collected)
# is a failure here, never a silent pass.
test: $(VENV)/.test
	@$(PY) -m pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The synthetic-world benchmark of the embedded model (tables printed, CSV/JSON in out/eval).
eval: $(VENV)/.runtime
	$(VENV)/bin/diffedit eval shapes --out out/eval

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
