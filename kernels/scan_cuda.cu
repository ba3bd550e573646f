#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/scan_cuda.h"
#include "kernels/scan_single_pass.h"

namespace pnewton {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

PNEWTON_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The chunked scan's kernels: one thread per (b, chunk, h), h fastest so that a warp reads
// adjacent blocks (the column aggregate: per (b, chunk, h, column), column fastest, so that
// a chunk's k + 1 threads read each coefficient together). kernels/scan_chunked.h holds
// their code.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads)
    aggregate_kernel(ScanParams p, int64_t n_chunks, typename Acc<scalar_t>::type* M, typename Acc<scalar_t>::type* v) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t columns = chunk_threads(p.k), h = (i / columns) % p.H, c = (i / columns / p.H) % (n_chunks - 1);
  const int64_t b = i / columns / p.H / (n_chunks - 1);
  if (b >= p.B) return;
  if constexpr (K <= kMaxRegisterBlock) {
    chunk_aggregate<K, typename Acc<scalar_t>::type, scalar_t>(p, n_chunks, b, c, h, M, v);
  } else {
    chunk_aggregate_column<K, typename Acc<scalar_t>::type, scalar_t>(p, n_chunks, b, c, h,
                                                                      static_cast<int>(i % columns), M, v);
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads)
    carry_kernel(ScanParams p, int64_t n_chunks, const typename Acc<scalar_t>::type* M,
                 const typename Acc<scalar_t>::type* v, typename Acc<scalar_t>::type* carry) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * p.H) return;
  chunk_carry<K, typename Acc<scalar_t>::type, scalar_t>(p, n_chunks, i / p.H, i % p.H, M, v, carry);
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads)
    rescan_kernel(ScanParams p, int64_t n_chunks, const typename Acc<scalar_t>::type* carry) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * n_chunks * p.H) return;
  chunk_rescan<K, typename Acc<scalar_t>::type, scalar_t>(p, n_chunks, i / p.H / n_chunks, (i / p.H) % n_chunks,
                                                          i % p.H, carry);
}

size_t acc_bytes(DType dtype) { return dtype == DType::f64 ? sizeof(double) : sizeof(float); }

// ---- the chunked scan ---------------------------------------------------------------------

// How the time axis is cut: enough chunks that the aggregate's B·H·chunks·chunk_threads
// threads fill the device, each chunk at least a few dozen steps long.
int64_t chunked_time_chunks(const ScanParams& p, int num_sms) {
  const int64_t lanes = std::max<int64_t>(1, p.B * p.H * chunk_threads(p.k));
  const int64_t wanted_threads = static_cast<int64_t>(std::max(num_sms, 1)) * 2048;
  const int64_t by_occupancy = ceil_div(wanted_threads, lanes);
  const int64_t by_length = std::max<int64_t>(1, p.T / 64);
  return std::max<int64_t>(1, std::min(by_occupancy, by_length));
}

size_t chunked_scratch_bytes(const ScanParams& p, DType dtype, int64_t time_chunks) {
  const int64_t per_lane_chunk = p.k * p.k + 2 * p.k;
  return static_cast<size_t>(p.B * p.H * time_chunks * per_lane_chunk) * acc_bytes(dtype);
}

// Scratch layout: M [B, chunks, H, k, k], v [B, chunks, H, k], carry [B, chunks, H, k].
template <typename scalar_t, int K>
cudaError_t launch_chunked(const ScanParams& p, int64_t n_chunks, void* scratch, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t lanes = p.B * p.H;
  acc_t* M = static_cast<acc_t*>(scratch);
  acc_t* v = M + lanes * n_chunks * p.k * p.k;
  acc_t* carry = v + lanes * n_chunks * p.k;
  if (n_chunks > 1) {
    const int64_t threads = lanes * (n_chunks - 1) * chunk_threads(p.k);
    aggregate_kernel<scalar_t, K><<<ceil_div(threads, kThreads), kThreads, 0, stream>>>(p, n_chunks, M, v);
  }
  carry_kernel<scalar_t, K><<<ceil_div(lanes, kThreads), kThreads, 0, stream>>>(p, n_chunks, M, v, carry);
  rescan_kernel<scalar_t, K><<<ceil_div(lanes * n_chunks, kThreads), kThreads, 0, stream>>>(p, n_chunks, carry);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t chunked_dispatch_k(const ScanParams& p, int64_t n_chunks, void* scratch, cudaStream_t stream) {
  switch (p.k) {
    case 1: return launch_chunked<scalar_t, 1>(p, n_chunks, scratch, stream);
    case 2: return launch_chunked<scalar_t, 2>(p, n_chunks, scratch, stream);
    case 3: return launch_chunked<scalar_t, 3>(p, n_chunks, scratch, stream);
    case 4: return launch_chunked<scalar_t, 4>(p, n_chunks, scratch, stream);
    case 5: return launch_chunked<scalar_t, 5>(p, n_chunks, scratch, stream);
    case 6: return launch_chunked<scalar_t, 6>(p, n_chunks, scratch, stream);
    case 7: return launch_chunked<scalar_t, 7>(p, n_chunks, scratch, stream);
    case 8: return launch_chunked<scalar_t, 8>(p, n_chunks, scratch, stream);
    default: return launch_chunked<scalar_t, kMaxChunkedBlock>(p, n_chunks, scratch, stream);
  }
}

// ---- the single-pass scan (kernels/scan_single_pass.h) -------------------------------------

// Blocks per multiprocessor to budget registers for: the slice's S·(k² + k) values (two
// registers for a double) and about 32 more, out of 64K.
template <typename scalar_t, int K, int S>
constexpr int single_pass_min_blocks() {
  constexpr int per_value = sizeof(scalar_t) > 4 ? 2 : 1;
  constexpr int regs = S * (K * K + K) * per_value + 32;
  constexpr int blocks = 65536 / (regs * kSinglePassThreads);
  return blocks < 1 ? 1 : (blocks > 8 ? 8 : blocks);
}

template <typename scalar_t, int K, int S>
__global__ void __launch_bounds__(kSinglePassThreads, (single_pass_min_blocks<scalar_t, K, S>()))
    single_pass_kernel(ScanParams p, SinglePassGeometry geo, SinglePassStatus<typename Acc<scalar_t>::type> st,
                       unsigned* tile_counter) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int E = element_size<K>();
  __shared__ acc_t buf[2][kSinglePassThreads * E];
  __shared__ acc_t entering[32 * K];
  __shared__ unsigned tile;
  if (threadIdx.x == 0) tile = atomicAdd(tile_counter, 1u);  // tiles start in index order
  __syncthreads();
  const int64_t j = tile / geo.groups, g = tile % geo.groups, bi = g / geo.head_groups;
  const int64_t c = threadIdx.x % geo.C, q = threadIdx.x / geo.C;
  const int64_t h = (g % geo.head_groups) * geo.C + c;
  const int64_t pos0 = j * geo.L + q * S;
  SinglePassSlice<scalar_t, acc_t, K, S> slice;
  slice.load(p, bi, h, h < p.H ? pos0 : p.T);  // channels past H hold no steps
  slice.aggregate(&buf[0][threadIdx.x * E], &buf[0][threadIdx.x * E + K * K]);
  int cur = 0;
  for (int64_t d = 1; d < geo.P; d *= 2, cur = 1 - cur) {
    __syncthreads();
    slice_scan_round<K>(buf[cur], buf[1 - cur], geo.C, q, c, d);
  }
  __syncthreads();
  if (threadIdx.x < geo.C) {
    acc_t initial[K];
    for (int i = 0; i < K; ++i) initial[i] = 0;
    if (h < p.H) load_initial_state<K, acc_t, scalar_t>(p, bi, h, initial);
    const acc_t* total = &buf[cur][((geo.P - 1) * geo.C + c) * E];
    look_back<K>(st, geo, g, j, c, total, total + K * K, initial, &entering[c * K], true);
  }
  __syncthreads();
  if (h >= p.H) return;
  acc_t state[K];
  slice_entering_state<K>(buf[cur], geo.C, q, c, &entering[c * K], state);
  slice.rescan(p, bi, h, pos0, state);
}

// Scratch layout: tile counter and flags (ints, zeroed per launch), then M, v, state.
struct SinglePassLayout {
  size_t flags_bytes, total_bytes;
  int64_t slots;
};

int single_pass_steps(const ScanParams& p, const CudaScanOptions& o) {
  return single_pass_steps_supported(p.k, o.single_pass_steps) ? o.single_pass_steps
                                                                 : default_single_pass_steps(p.k);
}

SinglePassLayout single_pass_layout(const ScanParams& p, DType dtype, int steps) {
  const SinglePassGeometry geo = single_pass_geometry(p, steps);
  SinglePassLayout l;
  l.slots = geo.groups * geo.tiles * geo.C;
  l.flags_bytes = ceil_div((1 + l.slots) * sizeof(int), 16) * 16;
  l.total_bytes = l.flags_bytes + static_cast<size_t>(l.slots * (p.k * p.k + 2 * p.k)) * acc_bytes(dtype);
  return l;
}

template <typename scalar_t, int K, int S>
cudaError_t launch_single_pass(const ScanParams& p, DType dtype, void* scratch, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const SinglePassGeometry geo = single_pass_geometry(p, S);
  const SinglePassLayout l = single_pass_layout(p, dtype, S);
  unsigned* counter = static_cast<unsigned*>(scratch);
  acc_t* M = reinterpret_cast<acc_t*>(static_cast<char*>(scratch) + l.flags_bytes);
  const SinglePassStatus<acc_t> st{reinterpret_cast<int*>(counter + 1), M, M + l.slots * K * K,
                                   M + l.slots * (K * K + K)};
  cudaError_t err = cudaMemsetAsync(scratch, 0, l.flags_bytes, stream);
  if (err != cudaSuccess) return err;
  single_pass_kernel<scalar_t, K, S><<<geo.groups * geo.tiles, kSinglePassThreads, 0, stream>>>(p, geo, st, counter);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t run_typed(const ScanParams& p, DType dtype, const CudaScanOptions& o, void* scratch,
                      cudaStream_t stream) {
  if (resolve_cuda_scan(p, o.algorithm) == CudaScanAlgorithm::chunked) {
    return chunked_dispatch_k<scalar_t>(p, chunked_time_chunks(p, o.num_sms), scratch, stream);
  }
  const int S = single_pass_steps(p, o);
  if (p.k == 1) {
    if (S == 8) return launch_single_pass<scalar_t, 1, 8>(p, dtype, scratch, stream);
    if (S == 32) return launch_single_pass<scalar_t, 1, 32>(p, dtype, scratch, stream);
    return launch_single_pass<scalar_t, 1, 16>(p, dtype, scratch, stream);
  }
  if (S == 4) return launch_single_pass<scalar_t, 2, 4>(p, dtype, scratch, stream);
  return launch_single_pass<scalar_t, 2, 8>(p, dtype, scratch, stream);
}

}  // namespace

CudaScanAlgorithm resolve_cuda_scan(const ScanParams& p, CudaScanAlgorithm requested) {
  if (requested == CudaScanAlgorithm::chunked || !single_pass_supported(p.k)) return CudaScanAlgorithm::chunked;
  return CudaScanAlgorithm::single_pass;
}

size_t scan_cuda_scratch_bytes(const ScanParams& p, DType dtype, const CudaScanOptions& o) {
  if (resolve_cuda_scan(p, o.algorithm) == CudaScanAlgorithm::single_pass) {
    return single_pass_layout(p, dtype, single_pass_steps(p, o)).total_bytes;
  }
  return chunked_scratch_bytes(p, dtype, chunked_time_chunks(p, o.num_sms));
}

cudaError_t scan_cuda(const ScanParams& p, DType dtype, const CudaScanOptions& o, void* scratch,
                      cudaStream_t stream) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return cudaSuccess;
  if (p.k < 1 || p.k > kMaxCudaBlock) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::f32: return run_typed<float>(p, dtype, o, scratch, stream);
    case DType::f64: return run_typed<double>(p, dtype, o, scratch, stream);
    case DType::f16: return run_typed<__half>(p, dtype, o, scratch, stream);
    case DType::bf16: return run_typed<__nv_bfloat16>(p, dtype, o, scratch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pnewton
