// A 2-D fp32 transpose as an XLA FFI custom call (lm/kernels/transpose.py builds and
// registers it), for the kernel gradients of lm/models/custom_grads.py.
//
// XLA:CPU folds a transpose into the product that reads it (layout assignment gives the
// transposed value the layout of its operand), so xᵀ g over the token axis always ends up
// as a product contracting both operands' leading axis, which goes to Eigen at 150-200
// GFLOP/s instead of YNNPACK's ~300 for the same product with a row-major [in, N] operand.
// A custom call's result is a physical [C, R] array that the product reads as is.
//
// 8 x 8 blocks through registers (`Transpose8x8`), a strip of input rows per
// task on XLA's intra-op thread pool; edges element by element.

#include "cpu_common.h"

namespace {

constexpr int64_t kStrip = 64;  // input rows per task

// Input rows [r, r + N) (N a multiple of 8) into output columns [r, r + N): with N = 16
// each output row gets 64 contiguous bytes (a cache line) per pass.
template <int N>
inline void Strip(const float* X, float* Y, int64_t rows, int64_t cols, int64_t r) {
  const int64_t cols8 = cols / 8 * 8;
  for (int64_t c = 0; c < cols8; c += 8)
    for (int i = 0; i < N; i += 8)
      Transpose8x8(X + (r + i) * cols + c, cols, Y + c * rows + r + i, rows);
  for (int64_t c = cols8; c < cols; ++c)
    for (int64_t i = r; i < r + N; ++i) Y[c * rows + i] = X[i * cols + c];
}

ffi::Error TransposeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("need a 2-D array");
  const int64_t rows = dims[0], cols = dims[1];
  const float* X = x.typed_data();
  float* Y = y->typed_data();
  ParallelFor(pool, (rows + kStrip - 1) / kStrip, [&](int64_t task) {
    const int64_t r1 = std::min(rows, (task + 1) * kStrip);
    int64_t r = task * kStrip;
    for (; r + 16 <= r1; r += 16) Strip<16>(X, Y, rows, cols, r);
    for (; r + 8 <= r1; r += 8) Strip<8>(X, Y, rows, cols, r);
    for (; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) Y[c * rows + r] = X[r * cols + c];
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTranspose, TransposeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
