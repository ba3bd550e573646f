#pragma once
// The argument checks every op and the C++ API share: defined, strided, dtype (floating
// where values are solved; integer or bool where they index), one device for every tensor
// of a call, ranks and shapes. They read sizes through SymInts and never read data, so the
// meta kernels (csrc/meta_kernels.cpp) run exactly the checks the real kernels run; the few
// value checks (lengths within [0, T], the ELK λ > 0) read data and stay with the real
// kernels. Every message names the op and the argument.
#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

namespace pnewton {

// float32, float64, float16 or bfloat16: what the solver and the scans compute in.
bool is_solver_dtype(at::ScalarType type);

// A defined, strided tensor of a solver dtype, of the given rank (-1: any rank).
void check_floating(const char* op, const char* name, const at::Tensor& t, int64_t rank = -1,
                    const char* shape_doc = "");

// t is on ref's device and (same_dtype) has ref's dtype.
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name,
                bool same_dtype = true);

// t has exactly `shape`; shape_doc spells it ("[B, T, S]").
void check_shape(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                 const char* shape_doc);

// check_floating + check_like + check_shape: a float operand shaped and placed like ref.
void check_operand(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                   const char* shape_doc, const at::Tensor& ref, const char* ref_name);

// A [B] / [B, T] tensor of integers (lengths) or bools (resets): rank, sizes and dtype.
void check_integer(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                   const char* shape_doc);
void check_bool(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                const char* shape_doc, const at::Tensor& ref, const char* ref_name);

}  // namespace pnewton
