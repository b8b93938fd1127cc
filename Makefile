# Fresh machine: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create .venv and install on first use. On a CUDA machine: `make install TORCH=torch`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fashionfuse run configs/demo.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf runs/demo
