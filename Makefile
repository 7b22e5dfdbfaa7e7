# Quick start: `make demo` (edit an image with the embedded model) and `make test` (the whole
# suite). Both bootstrap a virtual environment in .venv from nothing; the CPU build of torch is
# installed first and pinned (.ci/constraints.txt) so pip never pulls a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c .ci/constraints.txt
DEMO   := out/demo
# The metric environment (the `eval` extra): torchvision needs its own torch build, so the metric
# libraries live in .venv-eval (CUDA build of torch 2.14.1, run on the CPU; .ci/constraints-eval.txt)
# and the main .venv stays CPU-only. Its tests are tests_eval/, collected only there.
EVENV  ?= .venv-eval
EPY    := $(EVENV)/bin/python
EPIP   := $(EPY) -m pip install --disable-pip-version-check -q -c .ci/constraints-eval.txt

.PHONY: demo test test-main test-eval install install-test install-eval eval bench clean

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

$(EVENV)/.eval: pyproject.toml .ci/constraints-eval.txt
	test -x $(EPY) || $(PYTHON) -m venv $(EVENV)
	$(EPIP) torch==2.14.1 torchvision==0.29.1
	$(EPIP) -e ".[eval]" pytest
	touch $@

install-eval: $(EVENV)/.eval

# Edit the shipped example with the embedded model: writes the edit, the mask and the panel.
demo: $(VENV)/.runtime
	@mkdir -p $(DEMO)
	$(VENV)/bin/diffedit edit weights/examples/red-circle-and-green-square.png \
		--source "a red circle and a green square on a gray background" \
		--target "a blue circle and a green square on a gray background" \
		--out $(DEMO)/edit.png --mask-out $(DEMO)/mask.png --panel-out $(DEMO)/panel.png --overwrite
	@echo "demo: the red circle becomes a blue circle; see $(DEMO)/panel.png (input | mask | edit)"

# The whole suite, slow full-size parity included, then the metric suite in .venv-eval. pytest's
# exit code 5 (no tests collected) is a failure here, never a silent pass.
test: test-main test-eval

test-main: $(VENV)/.test
	@$(PY) -m pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-eval: $(EVENV)/.eval
	@$(EPY) -m pytest -q -p no:cacheprovider --durations=10 tests_eval; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-eval: pytest collected no metric tests" >&2; exit 1; fi; exit $$rc

# The synthetic-world benchmark of the embedded model (tables printed, CSV/JSON in out/eval).
eval: $(VENV)/.runtime
	$(VENV)/bin/diffedit eval shapes --out out/eval

clean:
	rm -rf $(VENV) $(EVENV) out .pytest_cache .hypothesis
