# weit — set-up, tests, demo. `make test` and `make demo` work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install data test test-slow demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[data,generation,control,test,bench]'
	$(MAKE) --no-print-directory data
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (IDX files).
data:
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (tests that need it will be skipped)"; fi; \
	fi

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Pretrain the small recipe on Fashion-MNIST, materialize three sizes, test each (outputs: demo-out/).
demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python benchmarks/materialize.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
