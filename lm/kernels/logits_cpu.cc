// The tied output projection for a few rows (decoding): logits[m, v] = sum_d h[m, d] E[v, d]
// as an XLA FFI custom call (lm/kernels/logits.py).
//
// With up to 8 rows and a 50257 x 256 fp32 table the product is bound by reading the
// table (51 MB) once, but XLA's GEMM took 3.8 ms per batch-8 decoding step. Here every
// table row is read once, straight from the table, against all h rows (up to 8 in
// registers, two table rows at a time so each h load serves two), in tasks of 256
// vocabulary rows on XLA's intra-op thread pool.

#include "cpu_common.h"

namespace {

constexpr int64_t kVocabPerTask = 256;
constexpr int kGroup = 8;  // h rows per pass over the table: 8 x 2 vector accumulators

template <int G, int P>
inline void RowDots(const float* h, const float* e, int64_t d, int64_t v, float* out,
                    int64_t out_stride) {
  vf acc[G][P];
  for (int i = 0; i < G; ++i)
    for (int p = 0; p < P; ++p) acc[i][p] = Splat(0.0f);
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    vf ev[P];
    for (int p = 0; p < P; ++p) ev[p] = Load(e + p * d + k);
    for (int i = 0; i < G; ++i) {
      const vf hv = Load(h + i * d + k);
      for (int p = 0; p < P; ++p) acc[i][p] += hv * ev[p];
    }
  }
  for (int i = 0; i < G; ++i) {
    for (int p = 0; p < P; ++p) {
      float s = HorizontalSum(acc[i][p]);
      for (int64_t j = k; j < d; ++j) s += h[i * d + j] * e[p * d + j];
      out[i * out_stride + v + p] = s;
    }
  }
}

template <int G>
inline void Rows(const float* h, const float* E, int64_t d, int64_t v0, int64_t v1, float* out,
                 int64_t out_stride) {
  int64_t v = v0;
  for (; v + 2 <= v1; v += 2) RowDots<G, 2>(h, E + v * d, d, v, out, out_stride);
  if (v < v1) RowDots<G, 1>(h, E + v * d, d, v, out, out_stride);
}

// Rows<G> for G = 1..kGroup h rows
using RowsFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, float*, int64_t);
constexpr RowsFn kRowsFor[kGroup + 1] = {nullptr,  Rows<1>, Rows<2>, Rows<3>, Rows<4>,
                                         Rows<5>,  Rows<6>, Rows<7>, Rows<8>};

ffi::Error SmallLogitsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> logits) {
  const auto tdims = table.dimensions();
  const auto xdims = x.dimensions();
  if (tdims.size() != 2 || xdims.size() < 1 || xdims.back() != tdims[1]) {
    return ffi::Error::InvalidArgument("need x [..., D] and a table [V, D]");
  }
  const int64_t vocab = tdims[0], d = tdims[1];
  const int64_t rows = d ? static_cast<int64_t>(x.element_count()) / d : 0;
  const float* H = x.typed_data();
  const float* E = table.typed_data();
  float* O = logits->typed_data();
  ParallelFor(pool, (vocab + kVocabPerTask - 1) / kVocabPerTask, [&](int64_t task) {
    const int64_t v0 = task * kVocabPerTask, v1 = std::min(vocab, v0 + kVocabPerTask);
    for (int64_t m0 = 0; m0 < rows; m0 += kGroup) {
      const int64_t g = std::min<int64_t>(kGroup, rows - m0);
      const float* h = H + m0 * d;
      float* out = O + m0 * vocab;
      kRowsFor[g](h, E, d, v0, v1, out, vocab);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmSmallLogits, SmallLogitsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
