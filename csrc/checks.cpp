#include "csrc/checks.h"

#include <c10/util/Exception.h>

namespace pnewton {

bool is_solver_dtype(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

void check_floating(const char* op, const char* name, const at::Tensor& t, int64_t rank, const char* shape_doc) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a strided (dense) tensor, got layout ",
              t.layout());
  TORCH_CHECK(is_solver_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(rank < 0 || t.dim() == rank, op, ": ", name, " must be a ", rank, "-d tensor ", shape_doc, ", got a ",
              t.dim(), "-d tensor of shape ", t.sym_sizes());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name,
                bool same_dtype) {
  // The device first: a tensor on another device (meta included) is the error to report.
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                 const char* shape_doc) {
  TORCH_CHECK(t.sym_sizes() == shape, op, ": ", name, " must have shape ", shape_doc, " = ", shape, ", got ",
              t.sym_sizes());
}

void check_operand(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                   const char* shape_doc, const at::Tensor& ref, const char* ref_name) {
  check_floating(op, name, t);
  check_like(op, name, t, ref, ref_name);
  check_shape(op, name, t, shape, shape_doc);
}

void check_integer(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                   const char* shape_doc) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", name, " must be a strided tensor");
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, ": ", name,
              " must be an integer tensor, got ", t.scalar_type());
  check_shape(op, name, t, shape, shape_doc);
}

void check_bool(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                const char* shape_doc, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", name, " must be a strided tensor");
  TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor, got ", t.scalar_type());
  check_like(op, name, t, ref, ref_name, /*same_dtype=*/false);
  check_shape(op, name, t, shape, shape_doc);
}

}  // namespace pnewton
