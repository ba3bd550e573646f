#include <ATen/Version.h>

#include "csrc/cpu/cell_kernels.h"

namespace pnewton::cpu {
namespace {

enum class Capability { DEFAULT, AVX2, AVX512 };

Capability capability() {
  static const Capability chosen = [] {
#if PNEWTON_CPU_X86
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512") return Capability::AVX512;
    if (name == "AVX2") return Capability::AVX2;
#endif
    return Capability::DEFAULT;
  }();
  return chosen;
}

}  // namespace

void fused_cell_cpu(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end) {
  switch (capability()) {
#if PNEWTON_CPU_X86
    case Capability::AVX512: return AVX512::fused_cell_rows(p, dtype, begin, end);
    case Capability::AVX2: return AVX2::fused_cell_rows(p, dtype, begin, end);
#endif
    default: return DEFAULT::fused_cell_rows(p, dtype, begin, end);
  }
}

void newton_update_cpu(const NewtonUpdateParams& p, DType dtype, int64_t begin, int64_t end) {
  switch (capability()) {
#if PNEWTON_CPU_X86
    case Capability::AVX512: return AVX512::newton_update_rows(p, dtype, begin, end);
    case Capability::AVX2: return AVX2::newton_update_rows(p, dtype, begin, end);
#endif
    default: return DEFAULT::newton_update_rows(p, dtype, begin, end);
  }
}

void fused_loop_cpu(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end) {
  switch (capability()) {
#if PNEWTON_CPU_X86
    case Capability::AVX512: return AVX512::fused_loop_lanes(p, dtype, begin, end);
    case Capability::AVX2: return AVX2::fused_loop_lanes(p, dtype, begin, end);
#endif
    default: return DEFAULT::fused_loop_lanes(p, dtype, begin, end);
  }
}

}  // namespace pnewton::cpu
