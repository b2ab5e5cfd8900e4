// The index of each row's largest value (the first one on ties; the first NaN if a row
// has one, as jnp.argmax) as an XLA FFI custom call (lm/kernels/argmax.py): greedy
// decoding's token choice over a [B, V] logits row in two vectorised passes. XLA:CPU's
// variadic argmax reduction runs as a scalar loop, and lax.top_k(x, 1) sorts.

#include <cmath>

#include "cpu_common.h"

namespace {

int32_t RowArgmax(const float* x, int64_t v) {
  // pass 1: the max (NaN-free lanes; 4 accumulators), and whether any NaN is present
  vf m[4] = {Splat(-INFINITY), Splat(-INFINITY), Splat(-INFINITY), Splat(-INFINITY)};
  vi nan = vi{};
  int64_t j = 0;
  for (; j + 4 * kLanes <= v; j += 4 * kLanes) {
    for (int u = 0; u < 4; ++u) {
      const vf a = Load(x + j + u * kLanes);
      m[u] = a > m[u] ? a : m[u];
      nan |= (vi)(a != a);
    }
  }
  for (; j + kLanes <= v; j += kLanes) {
    const vf a = Load(x + j);
    m[0] = a > m[0] ? a : m[0];
    nan |= (vi)(a != a);
  }
  for (int u = 1; u < 4; ++u) m[0] = m[u] > m[0] ? m[u] : m[0];
  float mx = HorizontalMax(m[0]);
  bool any_nan = false;
  for (int l = 0; l < kLanes; ++l) any_nan |= nan[l] != 0;
  for (; j < v; ++j) {
    mx = x[j] > mx ? x[j] : mx;
    any_nan |= x[j] != x[j];
  }
  // pass 2: the first index holding it (a row of -inf or of NaN: index 0 or the first
  // NaN), a vector of lanes at a time
  int64_t i = 0;
  for (; i + kLanes <= v; i += kLanes) {
    const vf a = Load(x + i);
    const vi hit = any_nan ? (vi)(a != a) : (vi)(a == mx);
    bool any = false;
    for (int l = 0; l < kLanes; ++l) any |= hit[l] != 0;
    if (any) {
      for (int l = 0; l < kLanes; ++l) {
        if (hit[l]) return static_cast<int32_t>(i + l);
      }
    }
  }
  for (; i < v; ++i) {
    if (any_nan ? x[i] != x[i] : x[i] == mx) return static_cast<int32_t>(i);
  }
  return 0;
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
  if (rows > 1 && v >= 4096) {  // decoding's rows over XLA's threads
    ParallelFor(pool, rows, [&](int64_t r) { O[r] = RowArgmax(X + r * v, v); });
  } else {
    for (int64_t r = 0; r < rows; ++r) O[r] = RowArgmax(X + r * v, v);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmRowArgmax, ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
