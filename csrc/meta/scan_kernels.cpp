// Meta kernels of the scan ops (torch.compile's fake tensors run them too): the device
// kernels' code with a runner that computes nothing, so they check every argument and
// shape every output exactly as the CPU and CUDA kernels do.
#include "csrc/scan.h"

namespace pnewton {
namespace {

void run_scan_meta(const ScanOperands&) {}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, Meta, m) { register_scan_kernels<run_scan_meta>(m); }

}  // namespace pnewton
