#!/usr/bin/env bash
# One prepared GPU check: the library (built here with CUDA against this machine's torch,
# or a carried sm_90 build), the CUDA tests (pytest marker and the C++ suites), small
# cases under compute-sanitizer memcheck and racecheck, then the GPU benchmarks; a short
# table last (the headline of issue 26 at the end). About 6 minutes on an H200 (full);
# quick runs fewer layer benchmarks.
#
#   bash scripts/gpu_check.sh [quick|full|profile]
#
# profile: the library, the CUDA tests, memcheck of the fused passes, then kernel profiles
# and the headline table of issue 26 (B=16, D=64, T=65536) only (about 2 minutes).
#
# PNEWTON_PREBUILT=DIR uses DIR/libpnewton.so (and DIR/tests/cpp/*) when it loads and has
# CUDA kernels: a build made on a machine without a GPU, carried to save the build time.
# Otherwise, or when that fails, it builds build-gpu/ here with every core (no network).
# Logs go to $OUT (default /tmp/pnewton_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
OUT=${OUT:-/tmp/pnewton_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
status=0
t0=$(date +%s)
stage() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
stage "GPU: ${gpu:-none}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 | tail -2
$PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
nvcc --version 2>/dev/null | tail -1

# ---- the library ----------------------------------------------------------------------
# Import the package from the tree without pip: pnewton -> torch_ops, the library by path.
mkdir -p /tmp/pnewton_py && ln -sfn "$PWD/torch_ops" /tmp/pnewton_py/pnewton
export PYTHONPATH=/tmp/pnewton_py${PYTHONPATH:+:$PYTHONPATH}
probe='import torch, pnewton; assert pnewton.built_with_cuda, "no CUDA kernels"
x = pnewton.scan_diag(torch.rand(2, 100, 3, device="cuda"), torch.randn(2, 100, 3, device="cuda"))
torch.cuda.synchronize(); print("library ok:", pnewton._library._library_path())'
libdir=
if [ -n "${PNEWTON_PREBUILT:-}" ] && [ -f "$PNEWTON_PREBUILT/libpnewton.so" ]; then
  prebuilt=$(cd "$PNEWTON_PREBUILT" && pwd)
  if PNEWTON_LIBRARY="$prebuilt/libpnewton.so" $PY -c "$probe"; then
    libdir=$prebuilt
  else
    echo "carried library failed to load; building here"
  fi
fi
if [ -z "$libdir" ]; then
  stage "build (CUDA, arch $TORCH_CUDA_ARCH_LIST, $(nproc) jobs)"
  cmake -S . -B build-gpu -G Ninja -DPython3_EXECUTABLE="$(command -v $PY)" >"$OUT/build.txt" 2>&1 &&
    cmake --build build-gpu --parallel "$(nproc)" >>"$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
  libdir=$PWD/build-gpu
  PNEWTON_LIBRARY="$libdir/libpnewton.so" $PY -c "$probe" || exit 1
fi
export PNEWTON_LIBRARY="$libdir/libpnewton.so"
torch_lib=$($PY -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')

# ---- tests ------------------------------------------------------------------------------
stage "C++ suites (the CPU mirror of the CUDA scan, and the CUDA module test)"
for t in test_scan_kernels test_cpp_api; do
  bin=$libdir/tests/cpp/$t
  if [ -x "$bin" ]; then
    LD_LIBRARY_PATH="$libdir:$torch_lib" "$bin" --gtest_brief=1 >"$OUT/$t.log" 2>&1 ||
      { status=1; tail -20 "$OUT/$t.log"; }
    grep -E "^\[  (PASSED|FAILED|SKIPPED)" "$OUT/$t.log" | sed "s/^/$t: /" | tee -a "$OUT/cpp_tests.txt"
    rm -f "$OUT/$t.log"
  else
    echo "$t: not built (GoogleTest is missing here; carry the binaries with PNEWTON_PREBUILT)"
  fi
done

stage "pytest -m cuda"
# torch.nn's module samples need expecttest, which that machine may lack (no network there).
skip=; $PY -c "import expecttest" 2>/dev/null || skip="--ignore=tests/python/test_nn_parity.py"
timeout 240 $PY -m pytest tests/python -q -m cuda $skip -p no:cacheprovider -rfE --timeout 300 >"$OUT/pytest_cuda.txt" 2>&1 ||
  status=1
tail -25 "$OUT/pytest_cuda.txt"

if [ "$MODE" = profile ]; then
  # Where the headline shape's time goes (issue 26), then its table: no sanitizer, no grid.
  stage "profiles at B=16 D=64 T=65536"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -c "
import torch, pnewton
from torch.nn.utils.rnn import pack_padded_sequence
for layer in (pnewton.GRU(3, 8, batch_first=True, method='quasi_deer'), pnewton.DiagGRU(3, 40, batch_first=True),
              pnewton.DiagGRU(3, 40, batch_first=True, method='sequential'),
              pnewton.LSTM(3, 5, batch_first=True, method='block_deer'), pnewton.DiagLSTM(3, 12, batch_first=True),
              pnewton.RNN(3, 20, batch_first=True, method='quasi_deer'),
              pnewton.HeadGRU(3, 32, heads=2, batch_first=True), pnewton.HeadLSTM(3, 16, heads=2, batch_first=True)):
    layer = layer.cuda()
    x = torch.randn(3, 300, 3, device='cuda')
    layer(x)[0].square().sum().backward()
    packed = pack_padded_sequence(x, torch.tensor([300, 170, 9]), batch_first=True)
    layer(packed)[0].data.square().sum().backward()
print('ran')
" >"$OUT/memcheck.txt" 2>&1 && echo "memcheck clean" || { status=1; tail -20 "$OUT/memcheck.txt"; }
  grep -E "ERROR SUMMARY" "$OUT/memcheck.txt"
  for spec in "DiagGRU:auto" "DiagGRU:auto --backward" "GRU:quasi_deer"; do
    timeout 90 $PY benchmarks/profile_layer.py --device cuda --B 16 --D 64 --T 65536 --rows 22 --layer $spec 2>&1 |
      tee -a "$OUT/profile.txt"
  done
  stage "head cells (issue 22: the fused blocks and the 16×16 chunked scan)"
  timeout 100 $PY benchmarks/bench_heads.py --device cuda --B 16 --T 65536 --hidden 64 --k 4 16 --cells gru \
    --repeats 3 2>&1 | tee "$OUT/bench_heads.txt"
  stage "headline"
  timeout 200 $PY benchmarks/bench_headline.py --repeats 5 --deadline 120 --cases DiagGRU:auto:float32 DiagGRU:auto:bfloat16 DiagGRU:sequential:float32 GRU:quasi_deer:float32 DiagLSTM:auto:float32 LSTM:block_deer:float32 2>&1 | tee "$OUT/headline.txt"
  stage "summary (${gpu:-no GPU})"
  printf '%-14s %s\n' "pytest cuda" "$(tail -1 "$OUT/pytest_cuda.txt")"
  exit $status
fi

stage "compute-sanitizer: memcheck (small scans of both algorithms, one GRU solve with backward), racecheck"
if command -v compute-sanitizer >/dev/null 2>&1; then
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -c "
import os, torch, pnewton
a, b = torch.rand(2, 3000, 5, device='cuda'), torch.randn(2, 3000, 5, device='cuda')
A2 = torch.randn(3, 5000, 40, 2, 2, device='cuda') / 2
b2 = torch.randn(3, 5000, 40, 2, device='cuda')
for algorithm in ('single_pass', 'chunked'):
    os.environ['PNEWTON_CUDA_SCAN'] = algorithm
    pnewton.scan_diag(a, b, reverse=True).sum().item()
    pnewton.scan_diag(a.bfloat16(), b.bfloat16()).sum().item()
    pnewton.scan_block(A2, b2, transpose=True).sum().item()
os.environ.pop('PNEWTON_CUDA_SCAN')
A = torch.randn(2, 3000, 3, 4, 4, device='cuda') / 4
pnewton.scan_block(A, torch.randn(2, 3000, 3, 4, device='cuda'), transpose=True).sum().item()
A = torch.randn(2, 3000, 3, 13, 13, device='cuda') / 13
pnewton.scan_block(A, torch.randn(2, 3000, 3, 13, device='cuda'), reverse=True).sum().item()
head = pnewton.HeadGRU(3, 32, heads=2, batch_first=True).cuda()
head(torch.randn(2, 300, 3, device='cuda'))[0].square().sum().backward()
gru = pnewton.GRU(3, 8, batch_first=True).cuda()
gru(torch.randn(2, 300, 3, device='cuda'))[0].square().sum().backward()
print('ran')
" >"$OUT/memcheck.txt" 2>&1 && echo "memcheck clean" || { status=1; tail -20 "$OUT/memcheck.txt"; }
  grep -E "ERROR SUMMARY" "$OUT/memcheck.txt"
  timeout 90 compute-sanitizer --tool racecheck --error-exitcode 3 $PY -c "
import torch, pnewton
pnewton.scan_diag(torch.rand(2, 9000, 40, device='cuda'), torch.randn(2, 9000, 40, device='cuda')).sum().item()
pnewton.scan_block(torch.randn(1, 5000, 3, 2, 2, device='cuda') / 2, torch.randn(1, 5000, 3, 2, device='cuda')).sum().item()
" >>"$OUT/memcheck.txt" 2>&1 && echo "racecheck clean" || { status=1; tail -20 "$OUT/memcheck.txt"; }
else
  echo "compute-sanitizer not found"
fi

stage "sequence parallelism on NCCL (world size 1: the collectives' CUDA path, not a multi-GPU run)"
timeout 120 $PY -c "
import os, torch, torch.distributed as dist, pnewton
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29533')
dist.init_process_group('nccl', rank=0, world_size=1, device_id=torch.device('cuda', 0))
torch.manual_seed(0)
gi, W = torch.randn(4, 4096, 192, device='cuda', dtype=torch.float64), torch.randn(192, 64, device='cuda', dtype=torch.float64) / 16
s0 = torch.zeros(4, 64, device='cuda', dtype=torch.float64)
ref, rs = pnewton.newton_rnn('gru', gi, W, None, s0, method='quasi_deer')
out, st = pnewton.newton_rnn('gru', gi, W, None, s0, method='quasi_deer', group=dist.group.WORLD)
err = (out - ref).abs().max().item()
assert err < 1e-10 and torch.equal(st.iterations, rs.iterations), err
x = pnewton.distributed.scan_diag(torch.rand(2, 999, 8, device='cuda'), torch.randn(2, 999, 8, device='cuda'))
print('nccl sharded solve ok: max error', err, 'iterations', int(st.iterations.max()))
dist.destroy_process_group()
" >"$OUT/nccl.txt" 2>&1 || status=1
tail -3 "$OUT/nccl.txt"

# ---- benchmarks -------------------------------------------------------------------------
stage "benchmarks ($MODE)"
$PY benchmarks/bench_scan.py --device cuda --B 16 --T 65536 --D 256 --repeats 10 2>&1 | tee "$OUT/bench_scan.txt"
if [ "$MODE" = quick ]; then
  timeout 100 $PY benchmarks/bench_layers.py --device cuda --B 16 --D 64 --T 65536 \
    --layers GRU:quasi_deer LSTM:block_deer --deadline 60 2>&1 | tee "$OUT/bench_layers.txt"
else
  # The issue's grid, most important first; each invocation stops starting cases at its deadline.
  timeout 170 $PY benchmarks/bench_layers.py --device cuda --B 16 1 --D 64 16 256 --T 1024 16384 65536 262144 \
    --layers GRU:quasi_deer --deadline 90 2>&1 | tee -a "$OUT/bench_layers.txt"
  timeout 120 $PY benchmarks/bench_layers.py --device cuda --B 16 1 --D 64 16 256 --T 1024 16384 65536 262144 \
    --layers LSTM:block_deer --deadline 50 2>&1 | tee -a "$OUT/bench_layers.txt"
  # The same without the fused cell kernel (ATen gate ops), for the difference it makes.
  PNEWTON_FUSED_CELLS=0 timeout 60 $PY benchmarks/bench_layers.py --device cuda --B 16 --D 64 --T 65536 \
    --layers GRU:quasi_deer LSTM:block_deer --tag " aten" 2>&1 | tee -a "$OUT/bench_layers.txt"
  timeout 90 $PY benchmarks/bench_layers.py --device cuda --B 16 --D 16 64 --T 1024 16384 65536 \
    --layers DiagLSTM:auto GRU:deer DiagGRU:auto --deadline 40 2>&1 | tee -a "$OUT/bench_layers.txt"
fi
timeout 100 $PY benchmarks/bench_heads.py --device cuda --B 16 --T 65536 --hidden 64 --k 4 16 --cells gru \
  --repeats 3 2>&1 | tee "$OUT/bench_heads.txt"
# Where the GRU and DiagGRU forwards' time goes, kernel by kernel (not part of the pass/fail status).
for spec in GRU:quasi_deer DiagGRU:auto; do
  timeout 90 $PY benchmarks/profile_layer.py --device cuda --B 16 --D 64 --T 65536 --layer $spec >>"$OUT/profile.txt" 2>&1 ||
    echo "profile_layer $spec failed (see $OUT/profile.txt)"
done
# The headline of issue 26 (B=16, D=64, T=65536; its targets in the script's docstring).
timeout 200 $PY benchmarks/bench_headline.py --repeats 5 --deadline 120 2>&1 | tee "$OUT/headline.txt"

echo
stage "summary (${gpu:-no GPU}, library from $libdir)"
printf '%-14s %s\n' "pytest cuda" "$(tail -1 "$OUT/pytest_cuda.txt")"
printf '%-14s %s\n' "nccl" "$(tail -1 "$OUT/nccl.txt")"
sed 's/^/gtest          /' "$OUT/cpp_tests.txt" 2>/dev/null
grep -h 'ERROR SUMMARY' "$OUT/memcheck.txt" 2>/dev/null | sed 's/^/sanitizer      /'
cat "$OUT/bench_scan.txt"
grep -v "^device" "$OUT/bench_layers.txt" | awk 'NR == 1 || !/^layer/'
cat "$OUT/bench_heads.txt" 2>/dev/null
cat "$OUT/headline.txt"
exit $status
