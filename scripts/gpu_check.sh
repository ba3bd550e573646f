#!/usr/bin/env bash
# One prepared GPU check: build with CUDA against this machine's torch (no network
# needed), run the CUDA tests and the benchmarks, print a short table last.
#   bash scripts/gpu_check.sh        (results also saved under $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pnewton_gpu_check}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
status=0

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "== GPU: ${gpu:-none}"

echo "== build (CUDA, arch $TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DPython3_EXECUTABLE="$(command -v $PY)" >"$OUT/cmake.txt" 2>&1 &&
  cmake --build build-gpu --parallel "$(nproc)" >>"$OUT/cmake.txt" 2>&1 || { tail -40 "$OUT/cmake.txt"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
suffix=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
cp build-gpu/libpnewton.so "torch_ops/_C$suffix"
# Import the package from the tree without pip: pnewton -> torch_ops.
mkdir -p /tmp/pnewton_py && ln -sfn "$PWD/torch_ops" /tmp/pnewton_py/pnewton
export PYTHONPATH=/tmp/pnewton_py${PYTHONPATH:+:$PYTHONPATH}

echo "== ctest (skipped where GoogleTest is missing)"
if [ -f build-gpu/tests/cpp/test_scan_kernels ]; then
  ctest --test-dir build-gpu --output-on-failure 2>&1 | tail -3 | tee "$OUT/ctest.txt" || status=1
fi

echo "== pytest -m cuda"
$PY -m pytest tests/python -q -m cuda -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer memcheck (one small scan and solve)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  compute-sanitizer --tool memcheck --error-exitcode 3 $PY -c "
import torch, pnewton
a, b = torch.rand(2, 300, 5, device='cuda'), torch.randn(2, 300, 5, device='cuda')
pnewton.scan_diag(a, b, reverse=True).sum().item()
A = torch.randn(2, 300, 3, 4, 4, device='cuda') / 4
pnewton.scan_block(A, torch.randn(2, 300, 3, 4, device='cuda'), transpose=True).sum().item()
pnewton.GRU(3, 8, batch_first=True).cuda()(torch.randn(2, 200, 3, device='cuda'))[0].sum().item()
" >"$OUT/memcheck.txt" 2>&1 && echo "memcheck clean" || { status=1; tail -20 "$OUT/memcheck.txt"; }
fi

echo "== benchmarks"
$PY benchmarks/bench_scan.py --device cuda --B 16 --T 65536 --D 256 2>&1 | tee "$OUT/bench_scan_cuda.txt"
timeout 240 $PY benchmarks/bench_layers.py --device cuda --B 16 --D 64 --T 1024 16384 65536 \
  --layers GRU:quasi_deer LSTM:block_deer 2>&1 | tee "$OUT/bench_layers_cuda.txt"

echo
echo "== summary (${gpu:-no GPU})"
printf '%-12s %s\n' "cuda tests" "$(tail -1 "$OUT/pytest_cuda.txt")"
sed -n '2,$p' "$OUT/bench_scan_cuda.txt"
sed -n '2,$p' "$OUT/bench_layers_cuda.txt"
exit $status
