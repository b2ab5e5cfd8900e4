// fp32 matrix products C [N, F] = A [N, K] B [K, F] as an XLA FFI custom call
// (lm/kernels/gemm.py builds and registers it), for the dense layers' forward and
// input-gradient products, and C += A B in place for the table gradient's chunk sum.
//
// At the sizes of small models (768 x 128 x 512 in a `char_lm:baby` step, 2048 x 256 x
// 1024 in GPT / BERT 4x256) XLA:CPU's YNNPACK products ran at 70-90 % of what this
// straightforward kernel reaches on AVX-512: 12 rows x 32 columns of C in 24 AVX-512
// accumulators, A's elements broadcast, B's rows read in place (no packing: at these K a
// 32-column panel of B stays in L1 / L2), the rows of C split over XLA's intra-op thread
// pool in blocks of 48 (and the columns in blocks of 128 when there are fewer than 8 row
// blocks). With at most 12 rows (decoding) B's rows are prefetched ahead: greedy decoding
// at batch 8 1.04x (README, Performance). With AVX2 the same code runs 6 x 16 tiles in 12
// of its 16 registers, slower than YNNPACK on an AMD EPYC (768 x 128 x 512 0.67-0.77 ms
// against 0.62-0.70), so Python calls it there for decoding's few rows only (FewRows).
// F must be a multiple of 16. Built for a CPU with neither, the handlers return an error.

#include "cpu_common.h"

#if defined(__AVX512F__) || defined(__AVX2__)

namespace {

// One register of C's columns and the few operations the products need (Fma: cpu_common).
#if defined(__AVX512F__)
typedef __m512 V;
typedef __mmask16 Mask;
constexpr int kW = 16;         // floats per register
constexpr int kMaxRows = 12;  // 12 x 2 accumulators + 2 B vectors + 1 broadcast <= 32
inline V Zero() { return _mm512_setzero_ps(); }
inline V LoadU(const float* p) { return _mm512_loadu_ps(p); }
inline void StoreU(float* p, V x) { _mm512_storeu_ps(p, x); }
inline V Bcast(float x) { return _mm512_set1_ps(x); }
inline V Add(V a, V b) { return _mm512_add_ps(a, b); }
inline Mask FirstLanes(int64_t n) { return static_cast<Mask>((1u << n) - 1); }
inline V MaskLoad(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline void MaskStore(float* p, Mask m, V x) { _mm512_mask_storeu_ps(p, m, x); }
#else
typedef __m256 V;
typedef __m256i Mask;
constexpr int kW = 8;
constexpr int kMaxRows = 6;  // 6 x 2 accumulators + 2 B vectors + 1 broadcast <= 16
inline V Zero() { return _mm256_setzero_ps(); }
inline V LoadU(const float* p) { return _mm256_loadu_ps(p); }
inline void StoreU(float* p, V x) { _mm256_storeu_ps(p, x); }
inline V Bcast(float x) { return _mm256_set1_ps(x); }
inline V Add(V a, V b) { return _mm256_add_ps(a, b); }
inline Mask FirstLanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V MaskLoad(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
inline void MaskStore(float* p, Mask m, V x) { _mm256_maskstore_ps(p, m, x); }
#endif
constexpr int kPerLine = 16 / kW;  // registers per 64-byte cache line (prefetched once)

// C[i][0..kW NV) (+)= sum_k A[i][k] B[k][0..kW NV) for MR rows, accumulated over all of
// K; with `Acc` C's values are added.
// With `Prefetch` (a few rows of A: B is read once, from memory), B's row k + kAhead is
// asked for at row k: B's rows lie F floats apart, a page or more for wide layers, where
// the hardware prefetchers stop, so each row was a full memory latency.
constexpr int64_t kAhead = 12;

template <int MR, int NV, bool Prefetch, bool Acc = false>
inline void Micro(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K,
                  float* C, int64_t ldc) {
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Zero();
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (Prefetch) {
      for (int v = 0; v < NV; v += kPerLine)
        _mm_prefetch(reinterpret_cast<const char*>(B + (k + kAhead) * ldb + kW * v),
                     _MM_HINT_T0);
    }
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = LoadU(B + k * ldb + kW * v);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const V a = Bcast(A[i * lda + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = Fma(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      float* c = C + i * ldc + kW * v;
      StoreU(c, Acc ? Add(acc[i][v], LoadU(c)) : acc[i][v]);
    }
  }
}

// MR rows of C, columns [j0, j1) (multiples of kW).
template <int MR>
inline void Rows(const float* A, int64_t K, const float* B, int64_t F, int64_t j0, int64_t j1,
                 float* C, bool few_rows) {
  int64_t j = j0;
  if (few_rows) {
    for (; j + 2 * kW <= j1; j += 2 * kW) Micro<MR, 2, true>(A, K, B + j, F, K, C + j, F);
    for (; j + kW <= j1; j += kW) Micro<MR, 1, true>(A, K, B + j, F, K, C + j, F);
    return;
  }
  for (; j + 2 * kW <= j1; j += 2 * kW) Micro<MR, 2, false>(A, K, B + j, F, K, C + j, F);
  for (; j + kW <= j1; j += kW) Micro<MR, 1, false>(A, K, B + j, F, K, C + j, F);
}

template <int MR = kMaxRows>
void RowsUpTo(int64_t m, const float* A, int64_t K, const float* B, int64_t F, int64_t j0,
              int64_t j1, float* C, bool few_rows) {
  if constexpr (MR > 1) {
    if (m < MR) return RowsUpTo<MR - 1>(m, A, K, B, F, j0, j1, C, few_rows);
  }
  Rows<MR>(A, K, B, F, j0, j1, C, few_rows);
}

constexpr int64_t kTaskRows = 4 * kMaxRows, kTaskCols = 128;
constexpr int64_t kFewRows = 12;  // at most this many rows of A: B's rows prefetched
                                  // (gemm.py's AVX2_MAX_ROWS: AVX2 calls only these)

// At most kFewRows rows with AVX2 (decoding), against strips of 8 vectors (4 cache lines
// of each B row, prefetched): 8 rows at a time one vector of the strip at a time (8
// accumulators, each B vector loaded once for all 8), then 4 rows x 2 vectors, 2 x 4 and
// 1 x 8. AVX2's 6 x 16 tiles read one line of each B row per pass: greedy decoding at
// batch 1 ran 0.79x XLA's speed with them; with the strips batch 8 1.10x, batch 1 within
// noise (README, Performance). Rows were first taken one at a time against the strip,
// which reads the strip 8 times at batch 8, from L2 at best: a 1024-float-wide B's rows
// lie 4 KB apart and the strip's 256 rows alias onto 16 of L2's sets, so rows 2-8 read it
// from L3 (the [8, 256] x [256, 1024] product 1.75x faster now). Every C value is still
// one FMA chain over k in order: the values do not change.
inline void FewRows(int64_t m, const float* A, int64_t K, const float* B, int64_t F,
                    int64_t j0, int64_t j1, float* C) {
  int64_t j = j0;
  for (; j + 8 * kW <= j1; j += 8 * kW) {
    int64_t r = 0;
    for (; r + 8 <= m; r += 8)
      for (int v = 0; v < 8; ++v)
        Micro<8, 1, true>(A + r * K, K, B + j + v * kW, F, K, C + r * F + j + v * kW, F);
    for (; r + 4 <= m; r += 4)
      for (int v = 0; v < 8; v += 2)
        Micro<4, 2, true>(A + r * K, K, B + j + v * kW, F, K, C + r * F + j + v * kW, F);
    for (; r + 2 <= m; r += 2)
      for (int v = 0; v < 8; v += 4)
        Micro<2, 4, true>(A + r * K, K, B + j + v * kW, F, K, C + r * F + j + v * kW, F);
    for (; r < m; ++r) Micro<1, 8, true>(A + r * K, K, B + j, F, K, C + r * F + j, F);
  }
  for (; j + kW <= j1; j += kW)
    for (int64_t r = 0; r < m; ++r)
      Micro<1, 1, true>(A + r * K, K, B + j, F, K, C + r * F + j, F);
}

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
  const bool few_rows = N <= kFewRows;  // decoding: B streamed from memory once
  // whole rows per task, unless there are too few row blocks to spread over the threads
  const int64_t cols = row_tasks >= 8 ? F : kTaskCols;
  const int64_t col_tasks = F == 0 ? 0 : (F + cols - 1) / cols;
  ParallelFor(pool, row_tasks * col_tasks, [&](int64_t t) {
    const int64_t r0 = t / col_tasks * kTaskRows, r1 = std::min(N, r0 + kTaskRows);
    const int64_t j0 = t % col_tasks * cols, j1 = std::min(F, j0 + cols);
    if (kW == 8 && few_rows) return FewRows(N, A, K, B, F, j0, j1, C);
    for (int64_t r = r0; r < r1; r += kMaxRows)
      RowsUpTo(std::min<int64_t>(kMaxRows, r1 - r), A + r * K, K, B, F, j0, j1, C + r * F,
               few_rows);
  });
  return ffi::Error::Success();
}

// C[i][..] += A B for MR rows and the kW columns of one vector, the `mask` lanes only (a
// matrix's last, partial vector of columns).
template <int MR>
inline void MicroTailAcc(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K,
                         float* C, int64_t ldc, Mask mask) {
  V acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = Zero();
  for (int64_t k = 0; k < K; ++k) {
    const V b = MaskLoad(mask, B + k * ldb);
    for (int i = 0; i < MR; ++i) acc[i] = Fma(Bcast(A[i * lda + k]), b, acc[i]);
  }
  for (int i = 0; i < MR; ++i)
    MaskStore(C + i * ldc, mask, Add(acc[i], MaskLoad(mask, C + i * ldc)));
}

// MR rows of C += A B over columns [j0, j1) (any width; the matrix's last vector masked).
template <int MR>
inline void RowsAcc(const float* A, int64_t K, const float* B, int64_t ldb, int64_t j0,
                    int64_t j1, float* C, int64_t ldc) {
  int64_t j = j0;
  for (; j + 2 * kW <= j1; j += 2 * kW)
    Micro<MR, 2, false, true>(A, K, B + j, ldb, K, C + j, ldc);
  for (; j + kW <= j1; j += kW) Micro<MR, 1, false, true>(A, K, B + j, ldb, K, C + j, ldc);
  if (j < j1) MicroTailAcc<MR>(A, K, B + j, ldb, K, C + j, ldc, FirstLanes(j1 - j));
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
  return ffi::Error::InvalidArgument("lm_gemm is built for AVX-512 or AVX2 only");
}

ffi::Error GemmAccImpl(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                       ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::InvalidArgument("lm_gemm_acc is built for AVX-512 or AVX2 only");
}

}  // namespace

#endif

// The vector width this build's product was compiled for: 16 (AVX-512), 8 (AVX2), 0 (none).
extern "C" int LmGemmBuilt() {
#if defined(__AVX512F__)
  return 16;
#elif defined(__AVX2__)
  return 8;
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
