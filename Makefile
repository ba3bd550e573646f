# The README's two commands: `make demo` (build, then run the main job) and `make test`
# (build, then every test). Both install what they need first.
PYTHON ?= python3
BUILD_DIR ?= build
export PNEWTON_BUILD_DIR := $(abspath $(BUILD_DIR))

SANITIZE_DIR ?= build-sanitize

.PHONY: install demo test test-cpp test-sanitize test-python test-wheel bench clean

install:
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation -e .

demo: install
	$(PYTHON) examples/train_gru.py

test: install
	$(MAKE) test-cpp test-sanitize test-python test-wheel

test-cpp:
	ctest --test-dir $(BUILD_DIR) --output-on-failure --no-tests=error

# The torch-free kernel tests again, built with AddressSanitizer + UBSan.
test-sanitize:
	cmake -S . -B $(SANITIZE_DIR) -G Ninja -DPNEWTON_KERNELS_ONLY=ON -DPNEWTON_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(SANITIZE_DIR)
	ctest --test-dir $(SANITIZE_DIR) --output-on-failure --no-tests=error

test-python:
	$(PYTHON) -m pytest tests/python -q

# The wheel, installed into a fresh virtual environment, with the C++ example built against it.
test-wheel:
	PYTHON=$(PYTHON) bash scripts/test_wheel.sh

bench: install
	$(PYTHON) benchmarks/bench_scan.py

clean:
	rm -rf $(BUILD_DIR) $(SANITIZE_DIR) build-setuptools build-wheel torch_ops/_C*.so torch_ops/_build.json *.egg-info
