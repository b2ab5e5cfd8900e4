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

// Input rows [r, r + N) (N a multiple of 8) into output columns [r, r + N): with N = 16
// each output row gets 64 contiguous bytes (a cache line) per pass.
template <int N>
inline void Strip(const float* X, float* Y, int64_t rows, int64_t cols, int64_t r) {
  const int64_t cols8 = cols / 8 * 8;
  for (int64_t c = 0; c < cols8; c += 8)
    for (int i = 0; i < N; i += 8) Block8(X + (r + i) * cols + c, cols, Y + c * rows + r + i, rows);
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
