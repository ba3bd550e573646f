#include <stdexcept>

#include "kernels/cell_fused.h"

namespace pnewton {
namespace {

template <typename T>
void rows(const FusedCellParams& p, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t d = 0; d < p.D; ++d) fused_cell_element<T>(p, n, d);
  }
}

}  // namespace

void fused_cell_cpu(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::f32: return rows<float>(p, begin, end);
    case DType::f64: return rows<double>(p, begin, end);
    default: throw std::invalid_argument("pnewton::fused_cell_cpu: only f32 and f64");
  }
}

}  // namespace pnewton
