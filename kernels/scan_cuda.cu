#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/scan_cuda.h"

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

// Thread layout: one thread per (b, chunk, h), h fastest so a warp reads adjacent blocks.
struct Lane {
  int64_t b, c, h;
};

__device__ bool lane_of(const ScanParams& p, int64_t n_chunks, Lane* lane) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * n_chunks * p.H) return false;
  lane->h = i % p.H;
  lane->c = (i / p.H) % n_chunks;
  lane->b = i / (p.H * n_chunks);
  return true;
}

// Compile-time storage for one block's vectors and matrices in a thread.
template <int K>
struct Capacity {
  static constexpr int value = K > 0 ? K : kMaxCudaBlock;
};

// Phase 1: the aggregate (M, v) of chunk c of lane (b, h), for every chunk but the last.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads)
    aggregate_kernel(ScanParams p, int64_t n_chunks, typename Acc<scalar_t>::type* M_out,
                     typename Acc<scalar_t>::type* v_out) {
  using acc_t = typename Acc<scalar_t>::type;
  Lane lane;
  if (!lane_of(p, n_chunks, &lane) || lane.c == n_chunks - 1) return;
  const int k = block_size<K>(p.k);
  acc_t M[Capacity<K>::value * Capacity<K>::value], v[Capacity<K>::value], tmp[Capacity<K>::value * Capacity<K>::value + Capacity<K>::value];
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) M[i * k + j] = i == j ? acc_t(1) : acc_t(0);
    v[i] = 0;
  }
  const int64_t len = ceil_div(p.T, n_chunks);
  const int64_t pos1 = min(p.T, (lane.c + 1) * len);
  for (int64_t pos = lane.c * len; pos < pos1; ++pos) {
    const int64_t t = time_at(p, pos), ta = coefficient_time(p, pos);
    const scalar_t* in = input_at<scalar_t>(p, lane.b, t, lane.h);
    if (ta < 0) {
      for (int i = 0; i < k * k; ++i) M[i] = 0;
      for (int i = 0; i < k; ++i) v[i] = static_cast<acc_t>(in[i * p.b_stride[3]]);
    } else {
      fold<K>(p.k, coefficient<scalar_t>(p, lane.b, ta, lane.h), in, p.b_stride[3], M, v, tmp);
    }
  }
  const int64_t slot = (lane.b * n_chunks + lane.c) * p.H + lane.h;
  for (int i = 0; i < k * k; ++i) M_out[slot * k * k + i] = M[i];
  for (int i = 0; i < k; ++i) v_out[slot * k + i] = v[i];
}

// Phase 2: the state entering each chunk, carried across chunks in order.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads)
    carry_kernel(ScanParams p, int64_t n_chunks, const typename Acc<scalar_t>::type* M,
                 const typename Acc<scalar_t>::type* v, typename Acc<scalar_t>::type* carry) {
  using acc_t = typename Acc<scalar_t>::type;
  Lane lane;
  if (!lane_of(p, 1, &lane)) return;
  const int k = block_size<K>(p.k);
  const int64_t row = lane.b * n_chunks * p.H + lane.h;
  load_initial_state<K, acc_t, scalar_t>(p, lane.b, lane.h, carry + row * k);
  for (int64_t c = 1; c < n_chunks; ++c) {
    const int64_t prev = row + (c - 1) * p.H, next = prev + p.H;
    affine_apply<K>(p.k, StridedMatrix<acc_t>{M + prev * k * k, k, 1}, carry + prev * k, v + prev * k, 1,
                    carry + next * k);
  }
}

// Phase 3: every chunk rescanned from the state entering it, writing x.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads)
    rescan_kernel(ScanParams p, int64_t n_chunks, const typename Acc<scalar_t>::type* carry) {
  using acc_t = typename Acc<scalar_t>::type;
  Lane lane;
  if (!lane_of(p, n_chunks, &lane)) return;
  const int k = block_size<K>(p.k);
  acc_t s[Capacity<K>::value], next[Capacity<K>::value];
  const int64_t slot = (lane.b * n_chunks + lane.c) * p.H + lane.h;
  for (int i = 0; i < k; ++i) s[i] = carry[slot * k + i];
  const int64_t len = ceil_div(p.T, n_chunks);
  const int64_t pos1 = min(p.T, (lane.c + 1) * len);
  for (int64_t pos = lane.c * len; pos < pos1; ++pos) {
    const int64_t t = time_at(p, pos), ta = coefficient_time(p, pos);
    const scalar_t* in = input_at<scalar_t>(p, lane.b, t, lane.h);
    if (ta < 0) {
      for (int i = 0; i < k; ++i) next[i] = static_cast<acc_t>(in[i * p.b_stride[3]]);
    } else {
      affine_apply<K>(p.k, coefficient<scalar_t>(p, lane.b, ta, lane.h), s, in, p.b_stride[3], next);
    }
    scalar_t* out = output_at<scalar_t>(p, lane.b, t, lane.h);
    for (int i = 0; i < k; ++i) {
      s[i] = next[i];
      out[i * p.x_stride[3]] = static_cast<scalar_t>(next[i]);
    }
  }
}

size_t acc_bytes(DType dtype) { return dtype == DType::f64 ? sizeof(double) : sizeof(float); }

// Scratch layout: M [B, chunks, H, k, k], v [B, chunks, H, k], carry [B, chunks, H, k].
template <typename scalar_t, int K>
cudaError_t launch(const ScanParams& p, int64_t n_chunks, void* scratch, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t lanes = p.B * p.H;
  acc_t* M = static_cast<acc_t*>(scratch);
  acc_t* v = M + lanes * n_chunks * p.k * p.k;
  acc_t* carry = v + lanes * n_chunks * p.k;
  const int64_t chunk_blocks = ceil_div(lanes * n_chunks, kThreads);
  if (n_chunks > 1) {
    aggregate_kernel<scalar_t, K><<<chunk_blocks, kThreads, 0, stream>>>(p, n_chunks, M, v);
  }
  carry_kernel<scalar_t, K><<<ceil_div(lanes, kThreads), kThreads, 0, stream>>>(p, n_chunks, M, v, carry);
  rescan_kernel<scalar_t, K><<<chunk_blocks, kThreads, 0, stream>>>(p, n_chunks, carry);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t dispatch_k(const ScanParams& p, int64_t n_chunks, void* scratch, cudaStream_t stream) {
  switch (p.k) {
    case 1: return launch<scalar_t, 1>(p, n_chunks, scratch, stream);
    case 2: return launch<scalar_t, 2>(p, n_chunks, scratch, stream);
    case 3: return launch<scalar_t, 3>(p, n_chunks, scratch, stream);
    case 4: return launch<scalar_t, 4>(p, n_chunks, scratch, stream);
    case 5: return launch<scalar_t, 5>(p, n_chunks, scratch, stream);
    case 6: return launch<scalar_t, 6>(p, n_chunks, scratch, stream);
    case 7: return launch<scalar_t, 7>(p, n_chunks, scratch, stream);
    case 8: return launch<scalar_t, 8>(p, n_chunks, scratch, stream);
    default: return launch<scalar_t, 0>(p, n_chunks, scratch, stream);
  }
}

}  // namespace

int64_t cuda_time_chunks(const ScanParams& p, int num_sms) {
  const int64_t lanes = std::max<int64_t>(1, p.B * p.H);
  const int64_t wanted_threads = static_cast<int64_t>(std::max(num_sms, 1)) * 2048;
  const int64_t by_occupancy = ceil_div(wanted_threads, lanes);
  const int64_t by_length = std::max<int64_t>(1, p.T / 64);
  return std::max<int64_t>(1, std::min(by_occupancy, by_length));
}

size_t scan_cuda_scratch_bytes(const ScanParams& p, DType dtype, int64_t time_chunks) {
  const int64_t per_lane_chunk = p.k * p.k + 2 * p.k;
  return static_cast<size_t>(p.B * p.H * time_chunks * per_lane_chunk) * acc_bytes(dtype);
}

cudaError_t scan_cuda(const ScanParams& p, DType dtype, int64_t time_chunks, void* scratch,
                      cudaStream_t stream) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return cudaSuccess;
  if (p.k < 1 || p.k > kMaxCudaBlock) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::f32: return dispatch_k<float>(p, time_chunks, scratch, stream);
    case DType::f64: return dispatch_k<double>(p, time_chunks, scratch, stream);
    case DType::f16: return dispatch_k<__half>(p, time_chunks, scratch, stream);
    case DType::bf16: return dispatch_k<__nv_bfloat16>(p, time_chunks, scratch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pnewton
