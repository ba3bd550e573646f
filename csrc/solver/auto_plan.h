#pragma once
// How method="auto" runs a layer stack: torch's fused loop (csrc/solver/fused_loop.h) or
// the parallel solve. The choice is measured, not guessed: the first call of a shape class
// runs both, returns the faster's result and remembers the winner for the class (as
// cudnn.benchmark does); later calls run the winner alone. With grad mode on, the timing
// includes a backward pass. The probe holds one path's graph at a time (the loop is rerun
// when it wins), so it needs no more memory than the larger path. Below kMinParallelSteps steps the
// loop is taken without measuring (a parallel solve needs tens of whole-sequence passes).
// PNEWTON_AUTO = measure (default) | parallel | fused_loop overrides the choice.
#include <ATen/ATen.h>

#include <string>

namespace pnewton {

enum class StackPlan { fused_loop, parallel, measure };

constexpr int64_t kMinParallelSteps = 256;

// A shape class: device, cell, dtype, thread count, layer configuration, and T and B in
// powers of two.
std::string stack_class(c10::string_view cell, const at::Tensor& input, const at::Tensor& state0, int64_t num_layers,
                        bool bidirectional, bool batch_first, bool has_lengths);

// The plan for a class of T steps: forced by PNEWTON_AUTO, the loop below kMinParallelSteps,
// the remembered winner, or measure.
StackPlan stack_plan(const std::string& shape_class, int64_t T);
void remember_plan(const std::string& shape_class, StackPlan plan);

// Seconds since an arbitrary epoch, after the device of t has finished its work.
double synchronized_seconds(const at::Tensor& t);

}  // namespace pnewton
