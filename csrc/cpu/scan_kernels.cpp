// CPU kernels of the scan ops: at::parallel_for drives kernels/scan_cpu.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "csrc/scan.h"
#include "kernels/scan_cpu.h"

namespace pnewton {
namespace {

void parallel_for(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(begin, end, /*grain_size=*/1, body);
}

// fp16/bf16 are widened to fp32 for the scan and narrowed once at the end.
void run_scan_cpu(const ScanOperands& ops) {
  const at::ScalarType type = ops.x.scalar_type();
  if (type == at::kHalf || type == at::kBFloat16) {
    ScanOperands wide = ops;
    wide.A = ops.A.to(at::kFloat);
    wide.b = ops.b.to(at::kFloat);
    if (ops.x0.defined()) wide.x0 = ops.x0.to(at::kFloat);
    wide.x = at::empty(ops.x.sizes(), ops.x.options().dtype(at::kFloat));
    run_scan_cpu(wide);
    ops.x.copy_(wide.x);
    return;
  }
  const ScanParams p = scan_params(ops);
  scan_cpu(p, scan_dtype(type), default_cpu_schedule(p, at::get_num_threads()), parallel_for);
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, CPU, m) { register_scan_kernels<run_scan_cpu>(m); }

}  // namespace pnewton
