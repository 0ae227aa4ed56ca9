# berth: `make serve` sets up and serves the default model; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= default
ARGS   ?=

.PHONY: install model native serve test bench-engine bench-serving bench-peers bench-models clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

model: install
	$(PY) -c "from server.model_store import resolve_model; print(resolve_model('$(MODEL)'))"

# the C++ model step (kernels/native.py): compiled once per machine; serving falls back without it
native: install
	$(PY) -m kernels.native

serve: model
	-$(PY) -m kernels.native
	$(PY) -m server.cli serve --model $(MODEL) --host $(HOST) --port $(PORT) $(ARGS)

test: model native
	$(PY) -m pytest -q $(ARGS)

bench-engine: model
	$(PY) -m bench.engine $(ARGS)

bench-serving: install
	$(PY) -m bench.serving $(ARGS)

bench-peers: model
	$(PY) -m bench.peers $(ARGS)

# berth vs llama.cpp (built for this CPU) on synthetic 1B/8B/Qwen-shaped GGUFs (bench/models.py)
bench-models: model native
	$(PY) -m bench.models $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
