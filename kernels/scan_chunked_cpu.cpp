#include <stdexcept>
#include <vector>

#include "kernels/scan_chunked.h"

namespace pnewton {
namespace {

template <typename T, int K>
void chunked_typed(const ScanParams& p, int64_t n_chunks) {
  const int64_t k = p.k, slots = p.B * n_chunks * p.H;
  std::vector<T> M(slots * k * k), v(slots * k), carry(slots * k);
  for (int64_t b = 0; b < p.B; ++b) {  // 1. aggregates (the last chunk's is never read)
    for (int64_t c = 0; c + 1 < n_chunks; ++c) {
      for (int64_t h = 0; h < p.H; ++h) {
        if constexpr (K <= kMaxRegisterBlock) {
          chunk_aggregate<K, T, T>(p, n_chunks, b, c, h, M.data(), v.data());
        } else {
          for (int column = 0; column < chunk_threads(k); ++column) {
            chunk_aggregate_column<K, T, T>(p, n_chunks, b, c, h, column, M.data(), v.data());
          }
        }
      }
    }
  }
  for (int64_t b = 0; b < p.B; ++b) {  // 2. carries
    for (int64_t h = 0; h < p.H; ++h) chunk_carry<K, T, T>(p, n_chunks, b, h, M.data(), v.data(), carry.data());
  }
  for (int64_t b = 0; b < p.B; ++b) {  // 3. rescans
    for (int64_t c = 0; c < n_chunks; ++c) {
      for (int64_t h = 0; h < p.H; ++h) chunk_rescan<K, T, T>(p, n_chunks, b, c, h, carry.data());
    }
  }
}

template <typename T>
void chunked_dispatch(const ScanParams& p, int64_t n_chunks) {
  switch (p.k) {
    case 1: return chunked_typed<T, 1>(p, n_chunks);
    case 2: return chunked_typed<T, 2>(p, n_chunks);
    case 3: return chunked_typed<T, 3>(p, n_chunks);
    case 4: return chunked_typed<T, 4>(p, n_chunks);
    case 5: return chunked_typed<T, 5>(p, n_chunks);
    case 6: return chunked_typed<T, 6>(p, n_chunks);
    case 7: return chunked_typed<T, 7>(p, n_chunks);
    case 8: return chunked_typed<T, 8>(p, n_chunks);
    default: return chunked_typed<T, kMaxChunkedBlock>(p, n_chunks);
  }
}

}  // namespace

void scan_chunked_cpu(const ScanParams& p, DType dtype, int64_t n_chunks) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return;
  if (p.k < 1 || p.k > kMaxChunkedBlock) throw std::invalid_argument("pnewton::scan_chunked_cpu: k must be in [1, 16]");
  if (n_chunks < 1) throw std::invalid_argument("pnewton::scan_chunked_cpu: n_chunks must be >= 1");
  switch (dtype) {
    case DType::f32: return chunked_dispatch<float>(p, n_chunks);
    case DType::f64: return chunked_dispatch<double>(p, n_chunks);
    default: throw std::invalid_argument("pnewton::scan_chunked_cpu: only f32 and f64");
  }
}

}  // namespace pnewton
