# Entry points (see README): `make demo`, `make distill-demo` (after the demo) and `make test`; all create .venv
# on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

# pip compiles the installed modules one by one (about 35 s of the install on 2 cores); compileall does it on every
# core. It reports the few files that are not Python 3 (templates, test data inside packages), as pip ignores them.
$(VENV)/installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --no-compile -e '.[dev]'
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

DISTILL ?= runs/distill_demo

.PHONY: setup demo distill-demo test
setup: $(VENV)/installed

demo: setup
	$(PY) main.py fit --config configs/demo.yaml
	$(PY) main.py test --config configs/demo.yaml --ckpt_path $(RUN)/checkpoints/last.ckpt

$(RUN)/checkpoints/last.ckpt:
	$(MAKE) demo

# T2MD on the demo: teacher forcing, then feature KD from its student; score and export the student.
distill-demo: setup $(RUN)/checkpoints/last.ckpt
	$(PY) main.py fit --config configs/distill/demo.yaml --config configs/distill/demo_forcing.yaml
	$(PY) main.py fit --config configs/distill/demo.yaml
	$(PY) main.py test --config configs/distill/demo.yaml --ckpt_path $(DISTILL)/kd/checkpoints/last.ckpt
	$(PY) -m lit_dimba.export $(DISTILL)/kd/checkpoints/last.ckpt $(DISTILL)/export

# --maxschedchunk 1: each worker is sent the next test when it has fewer than 2 left (not chunks of 64 in a row), so
# the slow tests, which run first (tests/conftest.py), spread over the workers.
test: setup
	$(PY) -m pytest -q -n auto --maxschedchunk 1 tests
