#include "kernels/cell_fused_cuda.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

namespace pnewton {
namespace {

constexpr int kThreads = 256;

// Each row (a step of a sequence) is `lanes` threads striding over its channels, so that
// neighbouring threads read neighbouring numbers: rows up to 32 wide share a warp (lanes =
// WIDTH: 8, 16 or 32). Wider rows either take whole warps, a thread per channel (lanes =
// 32·⌈width / 32⌉ up to kThreads; longer rows loop), or one warp looping over the channels
// (warp_rows). Blocks hold kThreads / lanes rows. A row's reductions are combined by
// shuffles within each of its warps, and each warp writes its partial result (one per row
// with warp_rows, else fused_row_parts): no block barrier, so no warp waits for another's
// loads. Measured on an H200 (B = 16, T = 65536, D = 64, benchmarks/RESULTS.md): the cell
// pass and the VJP run faster a thread per channel (1.73 vs 1.97 ms, 1.28 vs 1.59 ms), the
// update, whose threads do little, faster looping (0.29 vs 0.55 ms).
struct RowGeometry {
  int lanes = 32, rows_per_block = 1;
  int64_t blocks = 0;
};

RowGeometry row_geometry(int64_t rows, int64_t width, bool warp_rows) {
  RowGeometry g;
  g.lanes = width <= 8 ? 8 : width <= 16 ? 16 : warp_rows ? 32 : static_cast<int>(32 * fused_row_parts(width));
  g.rows_per_block = kThreads / g.lanes;
  g.blocks = (rows + g.rows_per_block - 1) / g.rows_per_block;
  return g;
}

// The row of this thread.
template <typename I>
__device__ I row_of(int lanes, int rows_per_block) {
  return static_cast<I>(blockIdx.x) * rows_per_block + threadIdx.x / lanes;
}

template <int WIDTH, typename T>
__device__ T group_sum(T v) {
  PNEWTON_UNROLL
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, WIDTH);
  return v;
}

template <int WIDTH, typename T>
__device__ T group_max(T v) {
  PNEWTON_UNROLL
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset, WIDTH));
  return v;
}

// The total of the shares of this thread's group of WIDTH threads (all of its warp's part
// of the row). Every thread of the warp calls it, those past the last row too.
template <int WIDTH, typename T>
__device__ FusedRowShare<T> group_total(FusedRowShare<T> share) {
  share.residual = group_max<WIDTH>(share.residual);
  share.scale = group_max<WIDTH>(share.scale);
  share.square = group_sum<WIDTH>(share.square);
  return share;
}

// The cell kind is a template argument: each kernel holds one cell's math only, which cuts
// the GRU pass from 60 registers to 40 (occupancy 50% to 75%). ROWS > 1: each thread holds
// one channel (rows no wider than its group) of ROWS rows, rows_per_block apart, and loads
// all of them before computing any, so that more loads are in flight per thread.
template <typename T, int WIDTH, FusedCell CELL, int ROWS, typename I>
__global__ void __launch_bounds__(kThreads) fused_cell_kernel(FusedCellParams p, int lanes, int rows_per_block) {
  p.cell = CELL;
  const I lane = threadIdx.x % lanes, N = static_cast<I>(p.N), D = static_cast<I>(p.D);
  const I first = static_cast<I>(blockIdx.x) * rows_per_block * ROWS + threadIdx.x / lanes;
  FusedRowShare<T> share[ROWS];
  if (ROWS == 1) {
    if (first < N) share[0] = fused_cell_row_share<T, I>(p, first, lane, lanes);
  } else {
    FusedChannelIn<T> in[ROWS];
    PNEWTON_UNROLL
    for (int r = 0; r < ROWS; ++r) {
      const I n = first + r * rows_per_block;
      if (n < N && lane < D) in[r] = fused_channel_load<T, I>(p, n, lane);
    }
    PNEWTON_UNROLL
    for (int r = 0; r < ROWS; ++r) {
      const I n = first + r * rows_per_block;
      if (n < N && lane < D) fused_channel_store<T, I>(p, n, lane, in[r], share[r]);
    }
  }
  PNEWTON_UNROLL
  for (int r = 0; r < ROWS; ++r) {
    const I n = first + r * rows_per_block;
    const FusedRowShare<T> total = group_total<WIDTH>(share[r]);
    if (n < N && lane % WIDTH == 0) fused_cell_row_finish<T, I>(p, n, lane / WIDTH, total);
  }
}

template <typename T, int WIDTH, typename I>
__global__ void __launch_bounds__(kThreads) newton_update_kernel(NewtonUpdateParams p, int lanes, int rows_per_block) {
  const I n = row_of<I>(lanes, rows_per_block), lane = threadIdx.x % lanes;
  T largest = T(0);
  if (n < static_cast<I>(p.N)) largest = newton_update_row_share<T, I>(p, n, lane, lanes);
  largest = group_max<WIDTH>(largest);
  if (n < p.N && lane == 0) newton_update_row_finish<T>(p, n, largest);  // one warp per row
}

template <typename T, int WIDTH, FusedCell CELL, typename I>
__global__ void __launch_bounds__(kThreads) fused_vjp_kernel(FusedVjpParams p, int lanes, int rows_per_block) {
  p.cell = CELL;
  const I n = row_of<I>(lanes, rows_per_block);
  if (n < static_cast<I>(p.N)) fused_vjp_row_share<T, I>(p, n, static_cast<I>(threadIdx.x % lanes), lanes);
}

// The loop of a per-channel cell: a thread per channel of a sequence (neighbouring threads
// read neighbouring channels of each step's gi), each through all T steps.
template <typename T, FusedCell CELL, typename I>
__global__ void __launch_bounds__(kThreads) fused_loop_kernel(FusedCellParams p) {
  p.cell = CELL;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x, B = p.N / p.T;
  if (i < B * p.D) fused_loop_channel<T, I>(p, static_cast<I>(i / p.D), static_cast<I>(i % p.D));
}

// Launches Kernel<T, WIDTH> over `rows` rows of `width` channels.
// row_numbers: the most numbers a row of any array holds.
template <template <typename, int> class Kernel, typename P>
cudaError_t launch_rows(const P& p, int64_t rows, int64_t width, int64_t row_numbers, bool warp_rows, DType dtype,
                        cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  const RowGeometry g = row_geometry(rows, width, warp_rows);
  const int threads = g.rows_per_block * g.lanes;
  // Offsets in 32 bits where every array's fit: the pass's address arithmetic was most of
  // its instructions in 64 bits (ncu on the H200: issue-bound at 85% of the SM's
  // throughput, the integer pipeline the busiest).
  const bool narrow = rows * row_numbers < std::numeric_limits<int32_t>::max();
  auto typed = [&](auto zero) {
    using T = decltype(zero);
    auto with_width = [&](auto width_tag) {
      constexpr int W = decltype(width_tag)::value;
      if (narrow) {
        Kernel<T, W>::template launch<int32_t>(p, g, threads, stream);
      } else {
        Kernel<T, W>::template launch<int64_t>(p, g, threads, stream);
      }
    };
    switch (g.lanes) {
      case 8: with_width(std::integral_constant<int, 8>{}); break;
      case 16: with_width(std::integral_constant<int, 16>{}); break;
      default: with_width(std::integral_constant<int, 32>{}); break;
    }
  };
  switch (dtype) {
    case DType::f32: typed(0.0f); break;
    case DType::f64: typed(0.0); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Calls fn(std::integral_constant<FusedCell, cell>{}).
template <typename Fn>
void with_cell(FusedCell cell, Fn&& fn) {
  switch (cell) {
    case FusedCell::gru: fn(std::integral_constant<FusedCell, FusedCell::gru>{}); break;
    case FusedCell::lstm: fn(std::integral_constant<FusedCell, FusedCell::lstm>{}); break;
    case FusedCell::rnn_tanh: fn(std::integral_constant<FusedCell, FusedCell::rnn_tanh>{}); break;
    case FusedCell::rnn_relu: fn(std::integral_constant<FusedCell, FusedCell::rnn_relu>{}); break;
  }
}

// Rows per thread of the cell pass: 2 where a row is no wider than its group of threads
// (H200, DiagGRU at B = 16, D = 64, T = 65536: 1.10 ms per pass against 1.21 with one row
// and 1.17 with four, which hold 64 registers); PNEWTON_CELL_ROWS = 1, 2 or 4 for tuning.
int cell_rows(const FusedCellParams& p, const RowGeometry& g) {
  static const int rows = [] {
    const char* env = std::getenv("PNEWTON_CELL_ROWS");
    const int v = env ? std::atoi(env) : 2;
    return v == 1 || v == 4 ? v : 2;
  }();
  return p.D <= g.lanes ? rows : 1;
}

template <typename T, int WIDTH>
struct CellKernel {
  template <typename I>
  static void launch(const FusedCellParams& p, const RowGeometry& g, int threads, cudaStream_t stream) {
    const int rows = cell_rows(p, g);
    const int64_t per_block = g.rows_per_block * rows, blocks = (p.N + per_block - 1) / per_block;
    with_cell(p.cell, [&](auto cell) {
      constexpr FusedCell C = decltype(cell)::value;
      if (rows == 4) {
        fused_cell_kernel<T, WIDTH, C, 4, I><<<blocks, threads, 0, stream>>>(p, g.lanes, g.rows_per_block);
      } else if (rows == 2) {
        fused_cell_kernel<T, WIDTH, C, 2, I><<<blocks, threads, 0, stream>>>(p, g.lanes, g.rows_per_block);
      } else {
        fused_cell_kernel<T, WIDTH, C, 1, I><<<blocks, threads, 0, stream>>>(p, g.lanes, g.rows_per_block);
      }
    });
  }
};

template <typename T, int WIDTH>
struct UpdateKernel {
  template <typename I>
  static void launch(const NewtonUpdateParams& p, const RowGeometry& g, int threads, cudaStream_t stream) {
    newton_update_kernel<T, WIDTH, I><<<g.blocks, threads, 0, stream>>>(p, g.lanes, g.rows_per_block);
  }
};

template <typename T, int WIDTH>
struct VjpKernel {
  template <typename I>
  static void launch(const FusedVjpParams& p, const RowGeometry& g, int threads, cudaStream_t stream) {
    with_cell(p.cell, [&](auto cell) {
      fused_vjp_kernel<T, WIDTH, decltype(cell)::value, I><<<g.blocks, threads, 0, stream>>>(p, g.lanes,
                                                                                          g.rows_per_block);
    });
  }
};

}  // namespace

cudaError_t fused_cell_cuda(const FusedCellParams& p, DType dtype, cudaStream_t stream) {
  if (p.row_parts != fused_row_parts(p.D)) return cudaErrorInvalidValue;
  // gi and the LSTM's 2×2 blocks hold 4·D numbers a row, a head cell's blocks D·k (4·D·k).
  const int64_t row_numbers = std::max<int64_t>(4 * p.D, fused_jacobian_row<int64_t>(p));
  return launch_rows<CellKernel>(p, p.N, p.D, row_numbers, false, dtype, stream);
}

cudaError_t fused_vjp_cuda(const FusedVjpParams& p, DType dtype, cudaStream_t stream) {
  return launch_rows<VjpKernel>(p, p.N, p.D, 4 * p.D, false, dtype, stream);
}

cudaError_t fused_loop_cuda(const FusedCellParams& p, DType dtype, cudaStream_t stream) {
  if (p.N == 0 || p.D == 0) return cudaSuccess;
  if (p.T <= 0 || p.N % p.T != 0) return cudaErrorInvalidValue;
  const int64_t threads = p.N / p.T * p.D, blocks = (threads + kThreads - 1) / kThreads;
  const bool narrow = p.N * 4 * p.D < std::numeric_limits<int32_t>::max();
  auto typed = [&](auto zero) {
    using T = decltype(zero);
    with_cell(p.cell, [&](auto cell) {
      constexpr FusedCell C = decltype(cell)::value;
      if (narrow) {
        fused_loop_kernel<T, C, int32_t><<<blocks, kThreads, 0, stream>>>(p);
      } else {
        fused_loop_kernel<T, C, int64_t><<<blocks, kThreads, 0, stream>>>(p);
      }
    });
  };
  switch (dtype) {
    case DType::f32: typed(0.0f); break;
    case DType::f64: typed(0.0); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t newton_update_cuda(const NewtonUpdateParams& p, DType dtype, cudaStream_t stream) {
  return launch_rows<UpdateKernel>(p, p.N, p.S, p.S, true, dtype, stream);
}

}  // namespace pnewton
