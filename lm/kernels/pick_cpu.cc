// Greedy decoding's token straight from the hidden state, exactly as argmax(x @ tableᵀ) of
// the few-row logits kernel (logits_cpu.cc) picks it, reading a quarter of the table
// (lm/kernels/pick.py).
//
// At batch 1 a greedy step reads the 51 MB fp32 output table once per token, two thirds
// of the step on a 2-core CPU. Here a one-off copy of the table in int8 (one scale per row,
// 13 MB) gives every logit approximately, with a bound per row on how far the exact fp32
// logit can be from it: |exact - approx| <= ||x|| * radius[v], radius[v] covering the
// row's rounding residual (Cauchy-Schwarz) and the fp32 rounding of both products. Every
// row whose upper bound reaches the largest lower bound is a candidate (the argmax always
// is one); the candidates' logits are computed again from the fp32 table with the very
// tiles of the logits kernel, and the first largest wins. Typically a few candidates per
// row. A row of x, a table row or an approximate logit that is not finite takes the whole
// fp32 product and argmax instead, so NaN and infinity pick as jnp.argmax does.

#include <cmath>

#include "gumbel.h"
#include "pick_cpu.h"

namespace {

// ---------------------------------------------------------------------------- quantize

// kLanes integral floats in [-127, 127] stored as int8.
inline void StoreInt8(int8_t* p, vf x) {
#if defined(__AVX512F__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm512_cvtepi32_epi8(_mm512_cvtps_epi32((__m512)x)));
#elif defined(__AVX2__)
  const __m256i i32 = _mm256_cvtps_epi32((__m256)x);
  const __m256i i8 = _mm256_packs_epi16(_mm256_packs_epi32(i32, i32), i32);
  const int32_t lo = _mm256_extract_epi32(i8, 0), hi = _mm256_extract_epi32(i8, 4);
  std::memcpy(p, &lo, 4);
  std::memcpy(p + 4, &hi, 4);
#else
  for (int l = 0; l < kLanes; ++l) p[l] = static_cast<int8_t>(x[l]);
#endif
}

// One table row (d a multiple of kLanes) to int8, q = w / scale rounded to nearest,
// scale = max|w| / 127, and its radius: for every x, |fp32 x.w (any summation order) -
// fp32 scale * (x.q)| <= ||x|| * radius, including the rounding of the bound's own fp32
// additions (see greedy.py).
void QuantizeRow(const float* w, int64_t d, int8_t* q, float* scale, float* radius) {
  vf mx = Splat(0.0f);
  vi bad = vi{};
  for (int64_t k = 0; k < d; k += kLanes) {
    const vf x = Load(w + k);
    const vf ax = (vf)((vi)x & 0x7FFFFFFF);
    mx = ax > mx ? ax : mx;
    bad |= (vi)(x - x != 0.0f);  // inf or NaN
  }
  bool finite = true;
  for (int l = 0; l < kLanes; ++l) finite &= bad[l] == 0;
  if (!finite) {  // always a candidate; the fp32 path gives its logit
    std::memset(q, 0, d);
    *scale = 0.0f;
    *radius = std::numeric_limits<float>::infinity();
    return;
  }
  const float m = HorizontalMax(mx);
  const float s = static_cast<float>(m / 127.0);
  const vf inv = Splat(s > 0.0f ? 127.0f / m : 0.0f), neg_s = Splat(-s);
  const vf shifter = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf r2 = Splat(0.0f), w2 = Splat(0.0f), q2 = Splat(0.0f);
  for (int64_t k = 0; k < d; k += kLanes) {
    const vf x = Load(w + k);
    vf t = (x * inv + shifter) - shifter;
    t = t > 127.0f ? Splat(127.0f) : t;
    t = t < -127.0f ? Splat(-127.0f) : t;
    StoreInt8(q + k, t);
    const vf r = Fma(neg_s, t, x);  // w - s q, rounded once
    r2 = Fma(r, r, r2);
    w2 = Fma(x, x, w2);
    q2 = Fma(t, t, q2);
  }
  // fp32 dot products of d terms err by at most (d + 2) u times the sum of |terms| (u =
  // 2^-24, Higham's gamma_d with the scale's product): twice that (the int16 pass's two
  // products and one conversion, 3u, fit in the second); HiddenShare for the int16
  // copy of x (pick_cpu.h); 0.1 % covers these fp32 norms' own rounding
  const double gamma = 2.0 * static_cast<double>(d + 2) * std::ldexp(1.0, -24);
  const double norm_q = s * std::sqrt(static_cast<double>(HorizontalSum(q2)));
  const double bound = std::sqrt(static_cast<double>(HorizontalSum(r2))) +
                       gamma * (std::sqrt(static_cast<double>(HorizontalSum(w2))) + norm_q) +
                       HiddenShare(d) * norm_q;
  *scale = s;
  *radius = static_cast<float>(bound * 1.001);
}

ffi::Error QuantizeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                        ffi::ResultBuffer<ffi::S8> q, ffi::ResultBuffer<ffi::F32> scale,
                        ffi::ResultBuffer<ffi::F32> radius) {
  const auto dims = table.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("need a table [V, D]");
  const int64_t vocab = dims[0], d = dims[1];
  if (d % kLanes != 0) {
    return ffi::Error::InvalidArgument("the width must be a multiple of the vector width");
  }
  const float* E = table.typed_data();
  int8_t* Q = q->typed_data();
  float* S = scale->typed_data();
  float* R = radius->typed_data();
  ParallelFor(pool, (vocab + kVocabPerTask - 1) / kVocabPerTask, [&](int64_t task) {
    const int64_t v1 = std::min(vocab, (task + 1) * kVocabPerTask);
    for (int64_t v = task * kVocabPerTask; v < v1; ++v)
      QuantizeRow(E + v * d, d, Q + v * d, S + v, R + v);
  });
  return ffi::Error::Success();
}

// The noise the sampling kernel adds: jax.random.gumbel(key_b, (V,)) for each key [B, 2]
// (out [B, V]); for tests and for checking the noise against jax's.
ffi::Error GumbelImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> keys,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = out->dimensions();
  const int64_t rows = static_cast<int64_t>(keys.element_count()) / 2;
  if (dims.size() != 2 || dims[0] != rows) return ffi::Error::InvalidArgument("need out [B, V]");
  const int64_t vocab = dims[1], per_row = (vocab + kVocabPerTask - 1) / kVocabPerTask;
  const uint32_t* K = keys.typed_data();
  ParallelFor(pool, rows * per_row, [&](int64_t task) {
    const int64_t b = task / per_row, v0 = task % per_row * kVocabPerTask;
    GumbelRange(K[2 * b], K[2 * b + 1], v0, std::min(kVocabPerTask, vocab - v0),
                out->typed_data() + b * vocab + v0);
  });
  return ffi::Error::Success();
}

#if defined(__AVX512F__) || defined(__AVX2__)  // the logits kernel's tiles

// A row's score of an exact logit l: greedy, l itself; sampled, fl(fl(l / t) + g[v]) with
// the row's noise g, so its first argmax is jnp.argmax(g + l / t), jax.random.categorical's
// draw. fp32 division and addition round monotonically, so the scores of a logit's bounds
// bound its score.
struct Score {
  const float* g;  // null: greedy
  float t;
  float operator()(float l, int64_t v) const { return g == nullptr ? l : g[v] + l / t; }
  vf operator()(vf l, int64_t v) const {
    return g == nullptr ? l : Load(g + v) + l / Splat(t);
  }
};

// The fp32 path for a row whose bounds are not finite: the logits kernel's whole row
// (TiledRows, as SmallLogitsImpl sums it), scored, and the argmax kernel's choice of it.
int32_t FullRow(Exact& exact, const Score& score, int64_t vocab, int64_t* rescored) {
  *rescored = vocab;
  float* row = Scratch(3, vocab);
  TiledRows(exact.h, exact.E, 1, exact.d, 0, vocab, row, vocab);
  if (score.g != nullptr) {
    for (int64_t v = 0; v < vocab; ++v) row[v] = score(row[v], v);
  }
  return RowArgmax(row, vocab);
}

// The row's token from its approximate logits a[0, vocab), the largest lower score L and
// ||x||: the first largest exact score among the rows whose upper score reaches L (the
// winner is one of them). `rescored` counts the exact logits computed (the whole
// vocabulary on the fp32 path, which a non-finite bound or logit takes).
int32_t PickRow(Exact& exact, const Score& score, const float* a, const float* R, float nx,
                float L, int64_t vocab, int64_t* rescored) {
  if (!std::isfinite(L) || !std::isfinite(nx)) return FullRow(exact, score, vocab, rescored);
  const vf vl = Splat(L), vn = Splat(nx);
  int64_t best = -1;
  float top = 0.0f;
  auto consider = [&](int64_t v) -> bool {
    const float x = exact(v);
    ++*rescored;
    if (!std::isfinite(x) || !std::isfinite(a[v])) return false;
    const float s = score(x, v);
    if (best < 0 || s > top) {
      best = v;
      top = s;
    }
    return true;
  };
  int64_t v = 0;
  for (; v + kLanes <= vocab; v += kLanes) {
    const vi hit = (vi)!(score(Fma(vn, Load(R + v), Load(a + v)), v) < vl);  // NaN: a candidate
    bool any = false;
    for (int l = 0; l < kLanes; ++l) any |= hit[l] != 0;
    if (!any) continue;
    for (int l = 0; l < kLanes; ++l) {
      if (hit[l] && !consider(v + l)) return FullRow(exact, score, vocab, rescored);
    }
  }
  for (; v < vocab; ++v) {
    if (!(score(a[v] + nx * R[v], v) < L) && !consider(v)) {
      return FullRow(exact, score, vocab, rescored);
    }
  }
  return best < 0 ? FullRow(exact, score, vocab, rescored) : static_cast<int32_t>(best);
}

// The noise of table rows [v0, v1) for a sampled h row into g, and the largest lower score
// fl(fl((a - ||x|| r) / t) + g) among them.
float NoiseAndLower(const uint32_t* key, const float* a, const float* R, float nx, float t,
                    int64_t v0, int64_t v1, float* g) {
  GumbelRange(key[0], key[1], v0, v1 - v0, g + v0);
  vf low = Splat(-std::numeric_limits<float>::infinity());
  const vf vn = Splat(nx), vt = Splat(t);
  int64_t v = v0;
  for (; v + kLanes <= v1; v += kLanes) {
    const vf lb = Load(g + v) + (Load(a + v) - vn * Load(R + v)) / vt;
    low = lb > low ? lb : low;
  }
  float out = HorizontalMax(low);
  for (; v < v1; ++v) out = std::max(out, g[v] + (a[v] - nx * R[v]) / t);
  return out;
}

// Tokens for the rows of x: greedy where `temperature` is null or a row's temperature is
// not > 0, else drawn with the row's key (`keys` [rows, 2]).
ffi::Error Pick(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& table,
                ffi::Buffer<ffi::S8>& q, ffi::Buffer<ffi::F32>& scale,
                ffi::Buffer<ffi::F32>& radius, const float* temperature, const uint32_t* keys,
                int64_t n_rows, ffi::ResultBuffer<ffi::S32>& out,
                ffi::ResultBuffer<ffi::S32>& rescored_out) {
  const auto tdims = table.dimensions();
  const auto xdims = x.dimensions();
  if (tdims.size() != 2 || xdims.size() < 1 || xdims.back() != tdims[1] ||
      q.element_count() != table.element_count() || scale.element_count() != tdims[0] ||
      radius.element_count() != tdims[0]) {
    return ffi::Error::InvalidArgument("need x [..., D], a table [V, D] and its quantized form");
  }
  const int64_t vocab = tdims[0], d = tdims[1];
  if (d % kLanes != 0 || vocab < 1) {
    return ffi::Error::InvalidArgument("the width must be a multiple of the vector width");
  }
  const int64_t rows = static_cast<int64_t>(x.element_count()) / d;
  if (temperature != nullptr && n_rows != rows) {
    return ffi::Error::InvalidArgument("need one temperature and one key per row of x");
  }
  const float* H = x.typed_data();
  const float* E = table.typed_data();
  const int8_t* Q = q.typed_data();
  const float* S = scale.typed_data();
  const float* R = radius.typed_data();
  int32_t* O = out->typed_data();
  int32_t* C = rescored_out->typed_data();
  auto sampled = [&](int64_t m) { return temperature != nullptr && temperature[m] > 0.0f; };

  float* nx = HiddenNorms(H, rows, d);
  const HiddenInt hi = QuantizeHidden(H, rows, d, nx);
  const int64_t tasks = (vocab + kVocabPerTask - 1) / kVocabPerTask;
  float* A = Scratch(1, rows * vocab);
  float* lower = Scratch(2, tasks * rows);
  bool any_sampled = false;
  for (int64_t m = 0; m < rows; ++m) any_sampled |= sampled(m);
  float* G = any_sampled ? Scratch(4, rows * vocab) : nullptr;  // the sampled rows' noise
  std::fill(lower, lower + tasks * rows, -std::numeric_limits<float>::infinity());
  ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t v0 = task * kVocabPerTask, v1 = std::min(vocab, v0 + kVocabPerTask);
    float* low = lower + task * rows;
    ApproxRows(H, hi, Q, S, R, nx, rows, d, vocab, v0, v1, A, low);
    for (int64_t m = 0; m < rows; ++m) {
      if (sampled(m)) {
        low[m] = NoiseAndLower(keys + 2 * m, A + m * vocab, R, nx[m], temperature[m], v0, v1,
                               G + m * vocab);
      }
    }
  });
  const int64_t tail = vocab / kLanes * kLanes;
  auto pick = [&](int64_t m) {
    float L = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < tasks; ++t) L = std::max(L, lower[t * rows + m]);
    Exact exact{H + m * d, E, d, tail};
    int64_t rescored = 0;
    const Score score = sampled(m) ? Score{G + m * vocab, temperature[m]} : Score{nullptr, 1.0f};
    O[m] = PickRow(exact, score, A + m * vocab, R, nx[m], L, vocab, &rescored);
    C[m] = static_cast<int32_t>(rescored);
  };
  ParallelFor(pool, rows, pick);  // one row: on this thread
  return ffi::Error::Success();
}

ffi::Error GreedyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> table,
                      ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> radius, ffi::ResultBuffer<ffi::S32> out,
                      ffi::ResultBuffer<ffi::S32> rescored_out) {
  return Pick(pool, x, table, q, scale, radius, nullptr, nullptr, 0, out, rescored_out);
}

ffi::Error SampleImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> table,
                      ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> radius, ffi::Buffer<ffi::F32> temperature,
                      ffi::Buffer<ffi::U32> keys, ffi::ResultBuffer<ffi::S32> out,
                      ffi::ResultBuffer<ffi::S32> rescored_out) {
  const int64_t n = static_cast<int64_t>(temperature.element_count());
  if (keys.element_count() != 2 * temperature.element_count()) {
    return ffi::Error::InvalidArgument("need one key [2] per temperature");
  }
  return Pick(pool, x, table, q, scale, radius, temperature.typed_data(), keys.typed_data(),
              n, out, rescored_out);
}

#else
// Python calls it only on CPUs with AVX-512 or AVX2 (build.has_simd); the library still
// builds elsewhere, for the other kernels.
ffi::Error GreedyImpl(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                      ffi::Buffer<ffi::S8>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                      ffi::ResultBuffer<ffi::S32>, ffi::ResultBuffer<ffi::S32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "the greedy kernel needs AVX-512 or AVX2");
}
ffi::Error SampleImpl(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                      ffi::Buffer<ffi::S8>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                      ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::U32>, ffi::ResultBuffer<ffi::S32>,
                      ffi::ResultBuffer<ffi::S32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "the sampling kernel needs AVX-512 or AVX2");
}
#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmQuantizeRows, QuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmGreedyTied, GreedyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmSampleTied, SampleImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmGumbelRows, GumbelImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
