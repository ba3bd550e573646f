#pragma once
// Buffers reused across the iterations of one solve. A buffer is handed out again once
// nothing but the workspace refers to its storage (the iteration that read it has dropped
// it), so an iteration's large tensors are allocated once per solve rather than once per
// iteration: on the CPU a fresh allocation of megabytes is fresh pages, and their faults
// cost about a sixth of a GRU iteration (B = 1, T = 4096, D = 64).
#include <ATen/ATen.h>

#include <vector>

namespace pnewton {

class Workspace {
 public:
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t numel = c10::multiply_integers(sizes);
    for (const at::Tensor& buffer : buffers_) {
      if (buffer.numel() == numel && buffer.dtype() == options.dtype() && buffer.device() == options.device() &&
          buffer.use_count() == 1 && buffer.storage().use_count() == 1) {
        return buffer.view(sizes);
      }
    }
    buffers_.push_back(at::empty({numel}, options));
    return buffers_.back().view(sizes);
  }

 private:
  std::vector<at::Tensor> buffers_;
};

// A buffer from the workspace, or a fresh tensor without one.
inline at::Tensor empty_in(Workspace* workspace, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return workspace ? workspace->empty(sizes, options) : at::empty(sizes, options);
}

}  // namespace pnewton
