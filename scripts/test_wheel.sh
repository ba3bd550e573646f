#!/usr/bin/env bash
# Builds pnewton's wheel and tests it as a user gets it: installed into a fresh virtual
# environment that sees the system's torch (--system-site-packages) and nothing of the source
# tree; imported from outside the tree; part of the Python suite against it; the C++ example
# and the consumer project built with find_package(pnewton) against the wheel's CMake
# config; and the refusal to load under a torch of another minor version. `make test` runs it.
#
#   bash scripts/test_wheel.sh        (PYTHON, PNEWTON_BUILD_DIR and WHEEL_DIR may be set)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WORK=${WHEEL_DIR:-$ROOT/build-wheel}
rm -rf "$WORK" && mkdir -p "$WORK"

echo "== pip wheel (against the installed torch, reusing the CMake build folder)"
# The CMake build folder is shared with the editable install; setuptools stages the package in
# build-setuptools/ (setup.py), cleared first so that no earlier file rides along.
rm -rf build-setuptools
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/pnewton-*.whl)
echo "$WHEEL ($(du -h "$WHEEL" | cut -f1))"
"$PYTHON" -m zipfile -l "$WHEEL" | awk '{print $1}' | grep -E 'pnewton/(lib/libpnewton\.so|include/pnewton/nn\.h|lib/cmake/pnewton/pnewtonConfig\.cmake|_build\.json)$'

echo "== a fresh virtual environment that sees the system's torch"
"$PYTHON" -m venv --system-site-packages "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install -q --no-deps "$WHEEL"
cd "$WORK"  # nothing of the source tree on the path
unset PNEWTON_LIBRARY PYTHONPATH
"$VPY" - <<'PY'
import os, sys, torch, pnewton
here = os.path.realpath(pnewton.__file__)
assert here.startswith(os.path.realpath(sys.prefix)), f"pnewton imported from {here}, not the wheel"
assert pnewton._library.loaded_from.endswith("pnewton/lib/libpnewton.so"), pnewton._library.loaded_from
x = torch.randn(3, 200, 5, dtype=torch.float64)
ours, theirs = pnewton.GRU(5, 8, batch_first=True).double(), torch.nn.GRU(5, 8, batch_first=True).double()
theirs.load_state_dict(ours.state_dict())
err = (ours(x)[0] - theirs(x)[0]).abs().max().item()
assert err < 1e-10, err
print(f"import from {os.path.dirname(here)}: GRU == torch.nn.GRU to {err:.1e}; cmake_prefix_path {pnewton.cmake_prefix_path}")
PY
"$VPY" -m pnewton.info | head -4

echo "== part of the Python suite against the wheel"
"$VPY" -m pytest -q -p no:cacheprovider --rootdir "$WORK" "$ROOT/tests/python/test_info.py" "$ROOT/tests/python/test_install.py" \
  "$ROOT/tests/python/test_scan.py" "$ROOT/tests/python/test_nn.py" -x 2>&1 | tail -3

echo "== the C++ example and the consumer project, find_package(pnewton) from the wheel"
PREFIX=$("$VPY" -c 'import pnewton, torch; print(pnewton.cmake_prefix_path + ";" + torch.utils.cmake_prefix_path)')
for project in examples/cpp tests/cpp/consumer; do
  name=$(basename "$project")
  # (LibTorch's CMake config warns about optional parts; the log is shown if a step fails.)
  cmake -S "$ROOT/$project" -B "$WORK/$name" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$PREFIX" \
    >"$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log"; exit 1; }
  cmake --build "$WORK/$name" >>"$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log"; exit 1; }
done
"$WORK/cpp/train_gru_cpp" 100 64 | tail -2
"$WORK/consumer/consumer"

echo "== the wheel refuses a torch of another minor version, with a message"
SITE=$("$VPY" -c 'import os, pnewton; print(os.path.dirname(pnewton.__file__))')
"$VPY" - "$SITE/_build.json" <<'PY'
import json, sys
path = sys.argv[1]
built = json.load(open(path))
major, minor = built["torch"].split(".")[:2]
built["torch"] = f"{major}.{int(minor) + 1}.0"
json.dump(built, open(path, "w"))
PY
if out=$("$VPY" -c 'import pnewton' 2>&1); then
  echo "FAIL: imported under a mismatched torch"; exit 1
fi
echo "$out" | grep -F "ImportError: pnewton was built against torch" || { echo "FAIL: $out"; exit 1; }
echo "wheel: OK"
