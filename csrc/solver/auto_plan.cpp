#include "csrc/solver/auto_plan.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>

namespace pnewton {
namespace {

std::mutex plans_mutex;
std::map<std::string, StackPlan>& plans() {
  static std::map<std::string, StackPlan> remembered;
  return remembered;
}

int64_t log2_bucket(int64_t n) { return n <= 1 ? 0 : static_cast<int64_t>(std::ceil(std::log2(double(n)))); }

StackPlan override_from_environment() {
  const char* value = std::getenv("PNEWTON_AUTO");
  const std::string v = value ? value : "";
  if (v.empty() || v == "measure") return StackPlan::measure;
  if (v == "parallel") return StackPlan::parallel;
  TORCH_CHECK(v == "fused_loop", "pnewton: PNEWTON_AUTO must be measure, parallel or fused_loop, got '", v, "'");
  return StackPlan::fused_loop;
}

}  // namespace

std::string stack_class(c10::string_view cell, const at::Tensor& input, const at::Tensor& state0, int64_t num_layers,
                        bool bidirectional, bool batch_first, bool has_lengths) {
  std::ostringstream key;
  key << input.device() << ' ' << cell << ' ' << input.scalar_type() << " threads=" << at::get_num_threads()
      << " in=" << input.size(2) << " S=" << state0.size(2) << " layers=" << num_layers << " bi=" << bidirectional
      << " T~2^" << log2_bucket(input.size(batch_first ? 1 : 0)) << " B~2^"
      << log2_bucket(input.size(batch_first ? 0 : 1)) << " lengths=" << has_lengths
      << " grad=" << at::GradMode::is_enabled();
  return key.str();
}

StackPlan stack_plan(const std::string& shape_class, int64_t T) {
  const StackPlan forced = override_from_environment();
  if (forced != StackPlan::measure) return forced;
  if (T < kMinParallelSteps) return StackPlan::fused_loop;
  {
    std::lock_guard<std::mutex> lock(plans_mutex);
    const auto known = plans().find(shape_class);
    if (known != plans().end()) return known->second;
  }
  return StackPlan::measure;
}

void remember_plan(const std::string& shape_class, StackPlan plan) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  plans()[shape_class] = plan;
}

double synchronized_seconds(const at::Tensor& t) {
  if (t.device().type() != c10::DeviceType::CPU) {
    c10::impl::getDeviceGuardImpl(t.device().type())->synchronizeDevice(t.device().index());
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace pnewton
