// Decoding's token choice as XLA FFI custom calls (lm/kernels/argmax.py). Greedy: the
// index of each row's largest value (the first one on ties; the first NaN if a row has
// one, as jnp.argmax) in two vectorised passes (XLA:CPU's variadic argmax reduction runs
// as a scalar loop, and lax.top_k(x, 1) sorts). Sampling: the token at quantile u of
// each row's softmax, as lm.generate.categorical_from_uniform computes it in XLA (block
// sums of exponentials, their running sum, then one block's), in one pass over the row
// plus one block instead of ~6 XLA operations over [B, V].

#include <cmath>

#include "cpu_common.h"

namespace {

// body(r) for every row: over XLA's threads where rows are long (decoding's vocabularies),
// inline where a task would cost more than the row.
void EachRow(ffi::ThreadPool& pool, int64_t rows, int64_t v,
             const std::function<void(int64_t)>& body) {
  if (rows > 1 && v >= 4096) {
    ParallelFor(pool, rows, body);
  } else {
    for (int64_t r = 0; r < rows; ++r) body(r);
  }
}

constexpr int64_t kBlock = 256;  // lm.generate.categorical_from_uniform's `block`


inline float BlockSum(const float* x, int64_t n, float mx) {
  vf acc = Splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) acc += Weight(Load(x + j), mx);
  float s = HorizontalSum(acc);
  for (; j < n; ++j) s += x[j] - mx < -87.0f ? 0.0f : std::exp(x[j] - mx);
  return s;
}

// The first index whose running sum of w exceeds t; where rounding leaves none, the last
// positive w (as lm.generate._first_above).
inline int64_t FirstAbove(const float* w, int64_t n, float t) {
  float run = 0.0f;
  int64_t last = -1;
  for (int64_t j = 0; j < n; ++j) {
    run += w[j];
    if (w[j] > 0.0f) last = j;
    if (run > t) return j;
  }
  return last < 0 ? 0 : last;
}

int32_t RowSample(const float* x, int64_t v, float u) {
  const float mx = RowMax(x, v);
  const int64_t blocks = (v + kBlock - 1) / kBlock;
  float* sums = Scratch(0, blocks);
  for (int64_t b = 0; b < blocks; ++b)
    sums[b] = BlockSum(x + b * kBlock, std::min(kBlock, v - b * kBlock), mx);
  float total = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) total += sums[b];
  const float target = u * total;
  const int64_t blk = FirstAbove(sums, blocks, target);
  float before = 0.0f;
  for (int64_t b = 0; b < blk; ++b) before += sums[b];
  const int64_t n = std::min(kBlock, v - blk * kBlock);
  float w[kBlock];
  for (int64_t i = 0; i < n; ++i) {
    const float d = x[blk * kBlock + i] - mx;
    w[i] = d < -87.0f ? 0.0f : std::exp(d);
  }
  return static_cast<int32_t>(blk * kBlock + FirstAbove(w, n, target - before));
}

ffi::Error SampleImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                      ffi::ResultBuffer<ffi::S32> out) {
  const auto dims = x.dimensions();
  if (dims.size() < 1 || dims.back() < 1 || u.element_count() * dims.back() != x.element_count()) {
    return ffi::Error::InvalidArgument("need logits [..., V] and one uniform per row");
  }
  const int64_t v = dims.back(), rows = static_cast<int64_t>(x.element_count()) / v;
  const float* X = x.typed_data();
  const float* U = u.typed_data();
  int32_t* O = out->typed_data();
  EachRow(pool, rows, v, [&](int64_t r) { O[r] = RowSample(X + r * v, v, U[r]); });
  return ffi::Error::Success();
}

ffi::Error ArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::ResultBuffer<ffi::S32> out) {
  const auto dims = x.dimensions();
  if (dims.size() < 1 || dims.back() < 1) {
    return ffi::Error::InvalidArgument("argmax needs a non-empty last axis");
  }
  const int64_t v = dims.back(), rows = static_cast<int64_t>(x.element_count()) / v;
  const float* X = x.typed_data();
  int32_t* O = out->typed_data();
  EachRow(pool, rows, v, [&](int64_t r) { O[r] = RowArgmax(X + r * v, v); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmRowArgmax, ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmRowSample, SampleImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
