// The tied output projection for a few rows (decoding, serving): logits[m, v] =
// sum_d h[m, d] E[v, d] as an XLA FFI custom call (lm/kernels/logits.py).
//
// With up to 8 rows and a 50257 x 256 fp32 table the product is bound by reading the
// table (51 MB) once, but XLA's GEMM took 3.8 ms per batch-8 decoding step. Here every
// table row is read once, straight from the table, in tasks of 256 vocabulary rows on
// XLA's intra-op thread pool. With a width that is a multiple of the vector (16 floats
// with AVX-512, 8 with AVX2), tiles of 4 h rows x 4 table rows (2 x 8, 1 x 16; with AVX2
// 4 x 2, 2 x 4, 1 x 8) keep one register of sums per (h row, table row) over the width
// and reduce a register's worth of them together (SumsOfLanes): on AVX-512 the batch-8
// product 1.52 -> 1.06 ms, batch 1 0.77 -> 0.75 ms (at the table's read time), against
// one horizontal sum per logit before; each block of table rows is read from memory once
// for all rows (32 rows: 2.85 ms against 3.28 in XLA's product). Otherwise up to 8 h
// rows in registers against two table rows at a time.

#include "logits_cpu.h"

namespace {

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
#if defined(__AVX512F__) || defined(__AVX2__)
    if (d % kLanes == 0) {
      TiledRows(H, E, rows, d, v0, v1, O, vocab);
      return;
    }
#endif
    GroupedRows(H, E, rows, d, v0, v1, O, vocab);
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
