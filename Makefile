# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

$(VENV)/installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

.PHONY: setup demo test
setup: $(VENV)/installed

demo: setup
	$(PY) main.py fit --config configs/demo.yaml
	$(PY) main.py test --config configs/demo.yaml --ckpt_path $(RUN)/checkpoints/last.ckpt

test: setup
	$(PY) -m pytest -q tests
