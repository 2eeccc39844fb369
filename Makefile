# The two entry points of the README: `make demo` and `make test`.
# Both build .venv from nothing (torch first, DeepSpeed after it without build
# isolation, because DeepSpeed's setup imports torch).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip byte-compiles every file it installs (21 000 here, ~100 s of the install's ~200 s on 2 cores);
# without it Python compiles a module the first time it is imported, and most are never imported.
NO_COMPILE := --no-compile
# The non-cluster tests run on this many pytest-xdist workers (--dist loadgroup, units set in tests/xdist_groups.py):
# each test file on one worker, so its module fixtures are built once, except that the files that train on a local
# Ray cluster share one group and run one after the other, first. The cluster tests run alone, one at a time: their
# timing bounds (scheduling timeouts, elastic resizes) assume an unloaded machine.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-fast test-cluster bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(NO_COMPILE) torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q $(NO_COMPILE) -e '.[test]'
	DS_BUILD_OPS=0 $(BIN)/pip install -q $(NO_COMPILE) --no-build-isolation deepspeed==0.19.8
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dipro demo

# pytest exits 5 when it collected no test; that is a failure of the suite here.
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=15 -m "not cluster" tests
	$(BIN)/python -m pytest --durations=15 -m cluster tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no cluster tests collected"; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not slow and not cluster" tests

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster tests

bench: $(STAMP)
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/shard.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/harmonize.py

# One GPU, < 6 minutes, shards made on the fly (benchmarks/gpu.py; --smoke runs it on a CPU).
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) demo_output
