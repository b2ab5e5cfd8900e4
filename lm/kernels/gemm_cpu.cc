// fp32 matrix products C [N, F] = A [N, K] B [K, F] as an XLA FFI custom call
// (lm/kernels/gemm.py builds and registers it), for the dense layers' forward and
// input-gradient products on AVX-512 CPUs.
//
// At the sizes of small models (768 x 128 x 512 in a `char_lm:baby` step, 2048 x 256 x
// 1024 in GPT / BERT 4x256) XLA:CPU's YNNPACK products ran at 70-90 % of what this
// straightforward kernel reaches: 12 rows x 32 columns of C in 24 AVX-512 accumulators,
// A's elements broadcast, B's rows read in place (no packing: at these K a 32-column
// panel of B stays in L1 / L2), the rows of C split over XLA's intra-op thread pool in
// blocks of 48 (and the columns in blocks of 128 when there are fewer than 8 row blocks).
// With at most 12 rows (decoding) B's rows are prefetched ahead: greedy decoding at
// batch 8 1.04x (README, Performance). F must be a multiple of 16. Built for other CPUs, the handler returns an error (Python
// calls it only where the CPU has AVX-512).

#include "cpu_common.h"

#if defined(__AVX512F__)

namespace {

// C[i][0..16 NV) (+)= sum_k A[i][k] B[k][0..16 NV) for MR rows, accumulated over all of
// K; with `Acc` C's values are added.
// With `Prefetch` (a few rows of A: B is read once, from memory), B's row k + kAhead is
// asked for at row k: B's rows lie F floats apart, a page or more for wide layers, where
// the hardware prefetchers stop, so each row was a full memory latency.
constexpr int64_t kAhead = 12;

template <int MR, int NV, bool Prefetch, bool Acc = false>
inline void Micro(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K,
                  float* C, int64_t ldc) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (Prefetch) {
      for (int v = 0; v < NV; ++v)
        _mm_prefetch(reinterpret_cast<const char*>(B + (k + kAhead) * ldb + 16 * v),
                     _MM_HINT_T0);
    }
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      float* c = C + i * ldc + 16 * v;
      _mm512_storeu_ps(c, Acc ? _mm512_add_ps(acc[i][v], _mm512_loadu_ps(c)) : acc[i][v]);
    }
  }
}

// MR rows of C, columns [j0, j1) (multiples of 16).
template <int MR>
inline void Rows(const float* A, int64_t K, const float* B, int64_t F, int64_t j0, int64_t j1,
                 float* C, bool few_rows) {
  int64_t j = j0;
  if (few_rows) {
    for (; j + 32 <= j1; j += 32) Micro<MR, 2, true>(A, K, B + j, F, K, C + j, F);
    for (; j + 16 <= j1; j += 16) Micro<MR, 1, true>(A, K, B + j, F, K, C + j, F);
    return;
  }
  for (; j + 32 <= j1; j += 32) Micro<MR, 2, false>(A, K, B + j, F, K, C + j, F);
  for (; j + 16 <= j1; j += 16) Micro<MR, 1, false>(A, K, B + j, F, K, C + j, F);
}

constexpr int kMaxRows = 12;  // 12 x 2 accumulators + 2 B vectors + 1 broadcast <= 32

template <int MR = kMaxRows>
void RowsUpTo(int64_t m, const float* A, int64_t K, const float* B, int64_t F, int64_t j0,
              int64_t j1, float* C, bool few_rows) {
  if constexpr (MR > 1) {
    if (m < MR) return RowsUpTo<MR - 1>(m, A, K, B, F, j0, j1, C, few_rows);
  }
  Rows<MR>(A, K, B, F, j0, j1, C, few_rows);
}

constexpr int64_t kTaskRows = 4 * kMaxRows, kTaskCols = 128;

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> c) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[0] || bd[1] % 16 != 0)
    return ffi::Error::InvalidArgument("lm_gemm needs [N, K] x [K, F], F a multiple of 16");
  const int64_t N = ad[0], K = ad[1], F = bd[1];
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  const int64_t row_tasks = (N + kTaskRows - 1) / kTaskRows;
  const bool few_rows = N <= kMaxRows;  // decoding: B streamed from memory once
  // whole rows per task, unless there are too few row blocks to spread over the threads
  const int64_t cols = row_tasks >= 8 ? F : kTaskCols;
  const int64_t col_tasks = F == 0 ? 0 : (F + cols - 1) / cols;
  ParallelFor(pool, row_tasks * col_tasks, [&](int64_t t) {
    const int64_t r0 = t / col_tasks * kTaskRows, r1 = std::min(N, r0 + kTaskRows);
    const int64_t j0 = t % col_tasks * cols, j1 = std::min(F, j0 + cols);
    for (int64_t r = r0; r < r1; r += kMaxRows)
      RowsUpTo(std::min<int64_t>(kMaxRows, r1 - r), A + r * K, K, B, F, j0, j1, C + r * F,
               few_rows);
  });
  return ffi::Error::Success();
}

// C[i][..] += A B for MR rows and the 16 columns of one vector, the `mask` lanes only (a
// matrix's last, partial vector of columns).
template <int MR>
inline void MicroTailAcc(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K,
                      float* C, int64_t ldc, __mmask16 mask) {
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b = _mm512_maskz_loadu_ps(mask, B + k * ldb);
    for (int i = 0; i < MR; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(A[i * lda + k]), b, acc[i]);
  }
  for (int i = 0; i < MR; ++i) {
    const __m512 c = _mm512_add_ps(acc[i], _mm512_maskz_loadu_ps(mask, C + i * ldc));
    _mm512_mask_storeu_ps(C + i * ldc, mask, c);
  }
}

// MR rows of C += A B over columns [j0, j1) (any width; the matrix's last vector masked).
template <int MR>
inline void RowsAcc(const float* A, int64_t K, const float* B, int64_t ldb, int64_t j0,
                    int64_t j1, float* C, int64_t ldc) {
  int64_t j = j0;
  for (; j + 32 <= j1; j += 32) Micro<MR, 2, false, true>(A, K, B + j, ldb, K, C + j, ldc);
  for (; j + 16 <= j1; j += 16) Micro<MR, 1, false, true>(A, K, B + j, ldb, K, C + j, ldc);
  if (j < j1) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (j1 - j)) - 1);
    MicroTailAcc<MR>(A, K, B + j, ldb, K, C + j, ldc, mask);
  }
}

template <int MR = kMaxRows>
void RowsAccUpTo(int64_t m, const float* A, int64_t K, const float* B, int64_t ldb,
                 int64_t j0, int64_t j1, float* C, int64_t ldc) {
  if constexpr (MR > 1) {
    if (m < MR) return RowsAccUpTo<MR - 1>(m, A, K, B, ldb, j0, j1, C, ldc);
  }
  RowsAcc<MR>(A, K, B, ldb, j0, j1, C, ldc);
}

// Columns of C per task for C += A B: at K = 512 a 256-column panel of B (512 KB) stays in
// L2 while every row of A passes over it.
constexpr int64_t kAccTaskCols = 256;

// C [N, F] += A [N, K] B [K, F] in place (the output aliases C): the table gradient's
// sum over a step's loss chunks (lm/objectives/losses.py), where XLA's product with the
// sum fused ran 52 ms per GPT chunk against 32 ms for the product alone.
ffi::Error GemmAccImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> c_in, ffi::ResultBuffer<ffi::F32> c) {
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c_in.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2 || ad[1] != bd[0] ||
      cd[0] != ad[0] || cd[1] != bd[1])
    return ffi::Error::InvalidArgument("lm_gemm_acc needs [N, K] x [K, F] and C [N, F]");
  const int64_t N = ad[0], K = ad[1], F = bd[1];
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  if (C != c_in.typed_data()) std::memcpy(C, c_in.typed_data(), sizeof(float) * N * F);
  const int64_t tasks = (F + kAccTaskCols - 1) / kAccTaskCols;
  ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t j0 = t * kAccTaskCols, j1 = std::min(F, j0 + kAccTaskCols), w = j1 - j0;
    // B's [K, w] panel copied contiguous (its rows lie F floats apart: a page or more
    // each, one TLB entry per row of every 32-column pass)
    float* panel = Scratch(0, K * w);
    for (int64_t k = 0; k < K; ++k) std::memcpy(panel + k * w, B + k * F + j0, 4 * w);
    for (int64_t r = 0; r < N; r += kMaxRows)
      RowsAccUpTo(std::min<int64_t>(kMaxRows, N - r), A + r * K, K, panel, w, 0, w,
                  C + r * F + j0, F);
  });
  return ffi::Error::Success();
}

}  // namespace

#else

namespace {

ffi::Error GemmImpl(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                    ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::InvalidArgument("lm_gemm is built for AVX-512 only");
}

ffi::Error GemmAccImpl(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                       ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::InvalidArgument("lm_gemm_acc is built for AVX-512 only");
}

}  // namespace

#endif

// Whether this build has the AVX-512 product (a build for an older -march has not).
extern "C" int LmGemmBuilt() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmGemmAcc, GemmAccImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
