// A 2-D fp32 transpose as an XLA FFI custom call (lm/kernels/transpose.py builds and
// registers it), for the kernel gradients of lm/models/custom_grads.py.
//
// XLA:CPU folds a transpose into the product that reads it (layout assignment gives the
// transposed value the layout of its operand), so xᵀ g over the token axis always ends up
// as a product contracting both operands' leading axis, which goes to Eigen at 150-200
// GFLOP/s instead of YNNPACK's ~300 for the same product with a row-major [in, N] operand.
// A custom call's result is a physical [C, R] array that the product reads as is.
//
// 8 x 8 blocks through registers (`TransposeRows`), a strip of input rows per
// task on XLA's intra-op thread pool; edges element by element.

#include "cpu_common.h"

namespace {

constexpr int64_t kStrip = 64;  // input rows per task

ffi::Error TransposeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("need a 2-D array");
  const int64_t rows = dims[0], cols = dims[1];
  const float* X = x.typed_data();
  float* Y = y->typed_data();
  ParallelFor(pool, (rows + kStrip - 1) / kStrip, [&](int64_t task) {
    TransposeRows(X, cols, task * kStrip, std::min(rows, (task + 1) * kStrip), cols, Y, rows);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTranspose, TransposeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
