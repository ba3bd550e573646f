#include "kernels/scan_cpu.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace pnewton {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The positions [begin, end) of chunk c out of n over T steps.
void chunk_range(int64_t T, int64_t n, int64_t c, int64_t* begin, int64_t* end) {
  const int64_t len = ceil_div(T, n);
  *begin = std::min(T, c * len);
  *end = std::min(T, *begin + len);
}

// The diagonal (k = 1) scan over unit-stride channels is the hot loop: pointers step
// through time and the channel loop is left for the compiler to vectorise.
bool unit_channels(const ScanParams& p) {
  return p.k == 1 && p.A_stride[2] == 1 && p.b_stride[2] == 1 && p.x_stride[2] == 1;
}

// Contiguous 2×2 blocks (A [.., H, 2, 2], b and x [.., H, 2]): the LSTM's block_deer scan.
bool unit_blocks2(const ScanParams& p) {
  return p.k == 2 && p.A_stride[2] == 4 && p.A_stride[3] == 2 && p.A_stride[4] == 1 && p.b_stride[2] == 2 &&
         p.b_stride[3] == 1 && p.x_stride[2] == 2 && p.x_stride[3] == 1;
}

// Pointers of a k = 1 tile (or of unit 2×2 blocks) at position pos, and their steps per position.
template <typename T>
struct DiagCursor {
  const T* a;
  const T* v;
  T* x;
  int64_t a_step, v_step, x_step;

  DiagCursor(const ScanParams& p, int64_t b, int64_t h0, int64_t pos) {
    const int64_t t = time_at(p, pos), dir = p.reverse ? -1 : 1;
    // A shifted scan reads its predecessor's multiplier; never dereferenced at pos 0.
    const int64_t ta = p.shift ? t - dir : t;
    a = static_cast<const T*>(p.A) + b * p.A_stride[0] + ta * p.A_stride[1] + h0 * p.A_stride[2];
    v = input_at<T>(p, b, t, h0);
    x = output_at<T>(p, b, t, h0);
    a_step = dir * p.A_stride[1], v_step = dir * p.b_stride[1], x_step = dir * p.x_stride[1];
  }
  void advance() { a += a_step, v += v_step, x += x_step; }
};

// Scans blocks [h0, h1) of batch row b over positions [pos0, pos1), starting from
// `state` ((h1 - h0) * k values, updated in place) and writing x.
template <typename T, int K>
void scan_tile(const ScanParams& p, int64_t b, int64_t h0, int64_t h1, int64_t pos0, int64_t pos1,
               T* state) {
  const int k = block_size<K>(p.k);
  if (K == 1 && unit_channels(p)) {
    const int64_t n = h1 - h0;
    T* __restrict__ s = state;
    DiagCursor<T> cur(p, b, h0, pos0);
    for (int64_t pos = pos0; pos < pos1; ++pos, cur.advance()) {
      const T* __restrict__ a = cur.a;
      const T* __restrict__ v = cur.v;
      T* __restrict__ x = cur.x;
      if (p.shift && pos == 0) {
        for (int64_t i = 0; i < n; ++i) x[i] = s[i] = v[i];
      } else if (n == 1) {
        x[0] = s[0] = a[0] * s[0] + v[0];
      } else {
        for (int64_t i = 0; i < n; ++i) x[i] = s[i] = a[i] * s[i] + v[i];
      }
    }
    return;
  }
  if (K == 2 && unit_blocks2(p)) {
    // As the generic loop below (affine_apply's order of operations), without its index
    // arithmetic per block.
    const int64_t n = h1 - h0;
    T* __restrict__ s = state;
    DiagCursor<T> cur(p, b, h0, pos0);
    const int64_t off = p.transpose ? 2 : 1, on = p.transpose ? 1 : 2;  // (0, 1) and (1, 0) entries
    for (int64_t pos = pos0; pos < pos1; ++pos, cur.advance()) {
      const T* __restrict__ a = cur.a;
      const T* __restrict__ v = cur.v;
      T* __restrict__ x = cur.x;
      if (p.shift && pos == 0) {
        for (int64_t i = 0; i < 2 * n; ++i) x[i] = s[i] = v[i];
        continue;
      }
      for (int64_t h = 0; h < n; ++h) {
        const T* m = a + 4 * h;
        const T s0 = s[2 * h], s1 = s[2 * h + 1];
        const T y0 = v[2 * h] + m[0] * s0 + m[off] * s1;
        const T y1 = v[2 * h + 1] + m[on] * s0 + m[3] * s1;
        x[2 * h] = s[2 * h] = y0;
        x[2 * h + 1] = s[2 * h + 1] = y1;
      }
    }
    return;
  }
  std::vector<T> next(k);
  for (int64_t pos = pos0; pos < pos1; ++pos) {
    const int64_t t = time_at(p, pos);
    const int64_t ta = coefficient_time(p, pos);
    for (int64_t h = h0; h < h1; ++h) {
      T* s = state + (h - h0) * k;
      const T* v = input_at<T>(p, b, t, h);
      if (ta < 0) {
        for (int i = 0; i < k; ++i) next[i] = v[i * p.b_stride[3]];
      } else {
        affine_apply<K>(p.k, coefficient<T>(p, b, ta, h), s, v, p.b_stride[3], next.data());
      }
      T* x = output_at<T>(p, b, t, h);
      for (int i = 0; i < k; ++i) x[i * p.x_stride[3]] = s[i] = next[i];
    }
  }
}

// Aggregate of positions [pos0, pos1) for blocks [h0, h1): M (k*k each) and v (k each).
template <typename T, int K>
void aggregate_tile(const ScanParams& p, int64_t b, int64_t h0, int64_t h1, int64_t pos0, int64_t pos1,
                    T* M, T* v) {
  const int k = block_size<K>(p.k);
  if (K == 1 && unit_channels(p)) {
    // The k = 1 fold: M ← a M, v ← a v + b, per channel.
    const int64_t n = h1 - h0;
    T* __restrict__ m = M;
    T* __restrict__ w = v;
    for (int64_t i = 0; i < n; ++i) m[i] = T(1), w[i] = T(0);
    DiagCursor<T> cur(p, b, h0, pos0);
    for (int64_t pos = pos0; pos < pos1; ++pos, cur.advance()) {
      const T* __restrict__ a = cur.a;
      const T* __restrict__ in = cur.v;
      if (p.shift && pos == 0) {
        for (int64_t i = 0; i < n; ++i) m[i] = T(0), w[i] = in[i];
      } else {
        for (int64_t i = 0; i < n; ++i) m[i] *= a[i], w[i] = a[i] * w[i] + in[i];
      }
    }
    return;
  }
  std::vector<T> tmp(k * k + k);
  for (int64_t h = h0; h < h1; ++h) set_identity<K>(k, M + (h - h0) * k * k, v + (h - h0) * k);
  for (int64_t pos = pos0; pos < pos1; ++pos) {
    const int64_t t = time_at(p, pos);
    const int64_t ta = coefficient_time(p, pos);
    for (int64_t h = h0; h < h1; ++h) {
      T* Mh = M + (h - h0) * k * k;
      T* vh = v + (h - h0) * k;
      const T* in = input_at<T>(p, b, t, h);
      if (ta < 0) {
        for (int i = 0; i < k * k; ++i) Mh[i] = 0;
        for (int i = 0; i < k; ++i) vh[i] = in[i * p.b_stride[3]];
      } else {
        fold<K>(p.k, coefficient<T>(p, b, ta, h), in, p.b_stride[3], Mh, vh, tmp.data());
      }
    }
  }
}

// Eight consecutive chunks of one k = 1 channel, each `len` steps from pos0 + j·len,
// advanced together: one channel's scan is a single dependent multiply-add chain, so
// interleaving independent chunks is what keeps a core busy. Aggregates (M, v) of each
// chunk, or with kRescan rescans each from v and writes x.
constexpr int kInterleave = 8;

template <typename T, bool kRescan>
void diag_chunk_group(const ScanParams& p, int64_t b, int64_t h, int64_t pos0, int64_t len, T* M, T* v) {
  const DiagCursor<T> c(p, b, h, pos0);
  const int64_t da = len * c.a_step, dv = len * c.v_step, dx = len * c.x_step;
  T m[kInterleave], s[kInterleave];
  for (int j = 0; j < kInterleave; ++j) m[j] = T(1), s[j] = kRescan ? v[j] : T(0);
  const T* a = c.a;
  const T* in = c.v;
  T* x = c.x;
  for (int64_t i = 0; i < len; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < kInterleave; ++j) {
      const T aj = a[j * da];
      if (!kRescan) m[j] *= aj;
      s[j] = aj * s[j] + in[j * dv];
      if (kRescan) x[j * dx] = s[j];
    }
    a += c.a_step, in += c.v_step, x += c.x_step;
  }
  if (!kRescan) {
    for (int j = 0; j < kInterleave; ++j) M[j] = m[j], v[j] = s[j];
  }
}

template <typename T, int K>
void scan_cpu_typed(const ScanParams& p, const CpuSchedule& s, const ParallelFor& parallel_for) {
  const int64_t k = p.k;
  const int64_t tiles_per_row = ceil_div(p.H, s.tile_heads);
  const int64_t n_tiles = p.B * tiles_per_row;
  const int64_t n_chunks = std::max<int64_t>(1, std::min(s.time_chunks, p.T));
  auto tile_bounds = [&](int64_t tile, int64_t* b, int64_t* h0, int64_t* h1) {
    *b = tile / tiles_per_row;
    *h0 = (tile % tiles_per_row) * s.tile_heads;
    *h1 = std::min(p.H, *h0 + s.tile_heads);
  };
  auto load_initial = [&](int64_t b, int64_t h0, int64_t h1, T* state) {
    for (int64_t h = h0; h < h1; ++h) load_initial_state<K, T, T>(p, b, h, state + (h - h0) * k);
  };

  if (n_chunks == 1) {
    parallel_for(0, n_tiles, [&](int64_t begin, int64_t end) {
      std::vector<T> state(s.tile_heads * k);
      for (int64_t tile = begin; tile < end; ++tile) {
        int64_t b, h0, h1;
        tile_bounds(tile, &b, &h0, &h1);
        load_initial(b, h0, h1, state.data());
        scan_tile<T, K>(p, b, h0, h1, 0, p.T, state.data());
      }
    });
    return;
  }

  // Phase 1: the aggregate of every chunk but the last (its aggregate is never needed).
  const int64_t M_size = s.tile_heads * k * k, v_size = s.tile_heads * k;
  std::vector<T> M(n_tiles * n_chunks * M_size), v(n_tiles * n_chunks * v_size);
  std::vector<T> carry(n_tiles * n_chunks * v_size);
  // One k = 1 channel per tile: each task's chunks of a tile run interleaved instead.
  const bool interleave = K == 1 && unit_channels(p) && s.tile_heads == 1;
  const int64_t full_len = ceil_div(p.T, n_chunks);
  // Chunks [c, c + 8) of a tile run as one group when all are full length and none holds
  // the zero multiplier of a shifted scan's first step; the others run one by one.
  auto groupable = [&](int64_t c) {
    int64_t begin, end;
    chunk_range(p.T, n_chunks, c + kInterleave - 1, &begin, &end);
    return (c > 0 || !p.shift) && end - begin == full_len;
  };
  auto interleaved = [&](int64_t begin, int64_t end, int64_t per_tile, bool rescan) {
    for (int64_t task = begin; task < end;) {
      const int64_t tile = task / per_tile, c = task - tile * per_tile;
      int64_t b, h0, h1, pos0, pos1;
      tile_bounds(tile, &b, &h0, &h1);
      chunk_range(p.T, n_chunks, c, &pos0, &pos1);
      const int64_t slot = tile * n_chunks + c;
      if (c + kInterleave <= per_tile && task + kInterleave <= end && groupable(c)) {
        if (rescan) {
          diag_chunk_group<T, true>(p, b, h0, pos0, full_len, nullptr, &carry[slot]);
        } else {
          diag_chunk_group<T, false>(p, b, h0, pos0, full_len, &M[slot], &v[slot]);
        }
        task += kInterleave;
      } else {
        if (rescan) {
          scan_tile<T, K>(p, b, h0, h1, pos0, pos1, &carry[slot]);
        } else {
          aggregate_tile<T, K>(p, b, h0, h1, pos0, pos1, &M[slot], &v[slot]);
        }
        task += 1;
      }
    }
  };
  parallel_for(0, n_tiles * (n_chunks - 1), [&](int64_t begin, int64_t end) {
    if (interleave) return interleaved(begin, end, n_chunks - 1, false);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task / (n_chunks - 1), c = task % (n_chunks - 1);
      int64_t b, h0, h1, pos0, pos1;
      tile_bounds(tile, &b, &h0, &h1);
      chunk_range(p.T, n_chunks, c, &pos0, &pos1);
      const int64_t slot = tile * n_chunks + c;
      aggregate_tile<T, K>(p, b, h0, h1, pos0, pos1, &M[slot * M_size], &v[slot * v_size]);
    }
  });
  // Phase 2: the state entering each chunk, carried across chunks in order.
  parallel_for(0, n_tiles, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      int64_t b, h0, h1;
      tile_bounds(tile, &b, &h0, &h1);
      T* first = &carry[tile * n_chunks * v_size];
      load_initial(b, h0, h1, first);
      for (int64_t c = 1; c < n_chunks; ++c) {
        const int64_t slot = tile * n_chunks + c - 1;
        for (int64_t h = 0; h < h1 - h0; ++h) {
          affine_apply<K>(k, StridedMatrix<T>{&M[slot * M_size + h * k * k], k, 1},
                          &carry[slot * v_size + h * k], &v[slot * v_size + h * k], 1,
                          &carry[(slot + 1) * v_size + h * k]);
        }
      }
    }
  });
  // Phase 3: every chunk rescanned from its carry.
  parallel_for(0, n_tiles * n_chunks, [&](int64_t begin, int64_t end) {
    if (interleave) return interleaved(begin, end, n_chunks, true);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task / n_chunks, c = task % n_chunks;
      int64_t b, h0, h1, pos0, pos1;
      tile_bounds(tile, &b, &h0, &h1);
      chunk_range(p.T, n_chunks, c, &pos0, &pos1);
      scan_tile<T, K>(p, b, h0, h1, pos0, pos1, &carry[(tile * n_chunks + c) * v_size]);
    }
  });
}

template <typename T>
void scan_cpu_dispatch_k(const ScanParams& p, const CpuSchedule& s, const ParallelFor& pf) {
  switch (p.k) {
    case 1: return scan_cpu_typed<T, 1>(p, s, pf);
    case 2: return scan_cpu_typed<T, 2>(p, s, pf);
    case 3: return scan_cpu_typed<T, 3>(p, s, pf);
    case 4: return scan_cpu_typed<T, 4>(p, s, pf);
    case 5: return scan_cpu_typed<T, 5>(p, s, pf);
    case 6: return scan_cpu_typed<T, 6>(p, s, pf);
    case 7: return scan_cpu_typed<T, 7>(p, s, pf);
    case 8: return scan_cpu_typed<T, 8>(p, s, pf);
    default: return scan_cpu_typed<T, 0>(p, s, pf);
  }
}

}  // namespace

CpuSchedule default_cpu_schedule(const ScanParams& p, int num_threads) {
  CpuSchedule s;
  num_threads = std::max(1, num_threads);
  // Tiles of at most ~256 scalars per step keep the running state in L1; cut rows
  // further only while there are fewer tiles than threads.
  const int64_t per_row = std::max<int64_t>(1, std::min(ceil_div(p.H * p.k, 256), p.H));
  const int64_t wanted = std::max<int64_t>(per_row, std::min(p.H, ceil_div(num_threads, std::max<int64_t>(p.B, 1))));
  s.tile_heads = std::max<int64_t>(1, ceil_div(p.H, wanted));
  const int64_t n_tiles = std::max<int64_t>(p.B, 1) * ceil_div(p.H, s.tile_heads);
  // Chunking time costs a second read of the inputs (and k-times more work for the
  // aggregates), so use it only when the tiles alone cannot feed the threads.
  if (n_tiles < num_threads && p.T >= 2048 && p.k <= 4) {
    s.time_chunks = std::min<int64_t>(ceil_div(num_threads, n_tiles) * 16, p.T / 512);
  }
  return s;
}

void scan_cpu(const ScanParams& p, DType dtype, const CpuSchedule& schedule, const ParallelFor& parallel_for) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return;
  switch (dtype) {
    case DType::f32: return scan_cpu_dispatch_k<float>(p, schedule, parallel_for);
    case DType::f64: return scan_cpu_dispatch_k<double>(p, schedule, parallel_for);
    default: throw std::invalid_argument("pnewton::scan_cpu: only f32 and f64 are scanned on the CPU");
  }
}

}  // namespace pnewton
