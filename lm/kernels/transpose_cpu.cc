// A 2-D fp32 transpose as an XLA FFI custom call (lm/kernels/transpose.py builds and
// registers it), for the kernel gradients of lm/models/custom_grads.py.
//
// XLA:CPU folds a transpose into the product that reads it (layout assignment gives the
// transposed value the layout of its operand), so xᵀ g over the token axis always ends up
// as a product contracting both operands' leading axis, which goes to Eigen at 150-200
// GFLOP/s instead of YNNPACK's ~300 for the same product with a row-major [in, N] operand.
// A custom call's result is a physical [C, R] array that the product reads as is.
//
// 8 x 8 blocks through registers (AVX: unpack, shuffle, permute), a strip of input rows per
// task on XLA's intra-op thread pool; edges element by element.

#include "cpu_common.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kStrip = 64;  // input rows per task

// out[c][r] = in[r][c] for r, c in [0, 8).
inline void Block8(const float* in, int64_t ld_in, float* out, int64_t ld_out) {
#if defined(__AVX2__) || defined(__AVX512F__)
  __m256 r[8], t[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ld_in);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ld_out, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ld_out, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) out[j * ld_out + i] = in[i * ld_in + j];
#endif
}

ffi::Error TransposeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("need a 2-D array");
  const int64_t rows = dims[0], cols = dims[1];
  const float* X = x.typed_data();
  float* Y = y->typed_data();
  const int64_t cols8 = cols / 8 * 8;
  ParallelFor(pool, (rows + kStrip - 1) / kStrip, [&](int64_t task) {
    const int64_t r0 = task * kStrip, r1 = std::min(rows, r0 + kStrip);
    int64_t r = r0;
    // 16 input rows at a time: each output row gets 64 contiguous bytes (a cache line)
    for (; r + 16 <= r1; r += 16) {
      for (int64_t c = 0; c < cols8; c += 8) {
        Block8(X + r * cols + c, cols, Y + c * rows + r, rows);
        Block8(X + (r + 8) * cols + c, cols, Y + c * rows + r + 8, rows);
      }
      for (int64_t c = cols8; c < cols; ++c)
        for (int64_t i = r; i < r + 16; ++i) Y[c * rows + i] = X[i * cols + c];
    }
    for (; r + 8 <= r1; r += 8) {
      for (int64_t c = 0; c < cols8; c += 8) Block8(X + r * cols + c, cols, Y + c * rows + r, rows);
      for (int64_t c = cols8; c < cols; ++c)
        for (int64_t i = r; i < r + 8; ++i) Y[c * rows + i] = X[i * cols + c];
    }
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
