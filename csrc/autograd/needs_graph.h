#pragma once
// Whether a backward op's result must carry a graph (double backward): grad mode on, as in
// backward(create_graph=True), and an input that requires grad.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>

#include <initializer_list>
#include <optional>

namespace pnewton {

inline bool needs_graph(std::initializer_list<std::optional<at::Tensor>> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : tensors) {
    if (t.has_value() && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

}  // namespace pnewton
