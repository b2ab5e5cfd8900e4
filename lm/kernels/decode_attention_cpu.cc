// One decoding step's attention over the KV cache as an XLA FFI custom call
// (lm/kernels/attention.py, `cached`): for every (row, key/value head) n and each of its
// R query heads, softmax(scale q kᵀ over the allowed keys) v, on the cache's own layouts
// (keys [N, K, S], values [N, S, K], lm.models.attention).
//
// XLA computed it as two batched products over the whole cache (`cache_len` slots) and a
// masked softmax between them: at batch 8 each product read every layer's 2.2 MB of keys
// or values in ~60 us, a quarter of the GPT 4x256 decoding step. Here only the keys
// between a row's first and last allowed one are read (on average half of the cache while
// it fills), the logits stay in a scratch row, and the (row, head) pairs run on XLA's
// intra-op thread pool. A query with no allowed key gets zeros (as the attention kernel).
// A logit bias (T5's relative positions) is an optional operand.

#include "cpu_common.h"

namespace {

// [first allowed, last allowed + 1) of one mask row (0, 0 when none is allowed).
void AllowedSpan(const uint8_t* m, int64_t s, int64_t* lo, int64_t* hi) {
  int64_t a = 0, z = s;
  while (a < z && !m[a]) ++a;
  while (z > a && !m[z - 1]) --z;
  *lo = a;
  *hi = z;
}

// logits[j] = scale * q · keys[:, j] for j in [lo, hi), keys [K, S] (row k contiguous over
// positions): four vectors of positions at a time, so four independent sums per k.
void Logits(const float* q, const float* keys, int64_t k_dim, int64_t s, int64_t lo,
            int64_t hi, float scale, float* logits) {
  int64_t j = lo;
  for (; j + 4 * kLanes <= hi; j += 4 * kLanes) {
    vf acc[4] = {Splat(0.0f), Splat(0.0f), Splat(0.0f), Splat(0.0f)};
    for (int64_t k = 0; k < k_dim; ++k) {
      const vf qk = Splat(q[k]);
      const float* row = keys + k * s + j;
      for (int u = 0; u < 4; ++u) acc[u] += qk * Load(row + u * kLanes);
    }
    for (int u = 0; u < 4; ++u) Store(logits + j + u * kLanes, acc[u] * scale);
  }
  for (; j + kLanes <= hi; j += kLanes) {
    vf acc = Splat(0.0f);
    for (int64_t k = 0; k < k_dim; ++k) acc += Splat(q[k]) * Load(keys + k * s + j);
    Store(logits + j, acc * scale);
  }
  for (; j < hi; ++j) {
    float acc = 0.0f;
    for (int64_t k = 0; k < k_dim; ++k) acc += q[k] * keys[k * s + j];
    logits[j] = acc * scale;
  }
}

// out = sum_j p[j] values[j, :] / total over j in [lo, hi), values [S, K].
void WeightedValues(const float* p, const float* values, int64_t k_dim, int64_t lo,
                    int64_t hi, float inv_total, float* out) {
  int64_t k0 = 0;
  for (; k0 + 4 * kLanes <= k_dim; k0 += 4 * kLanes) {
    vf acc[4] = {Splat(0.0f), Splat(0.0f), Splat(0.0f), Splat(0.0f)};
    for (int64_t j = lo; j < hi; ++j) {
      const vf pj = Splat(p[j]);
      const float* row = values + j * k_dim + k0;
      for (int u = 0; u < 4; ++u) acc[u] += pj * Load(row + u * kLanes);
    }
    for (int u = 0; u < 4; ++u) Store(out + k0 + u * kLanes, acc[u] * inv_total);
  }
  for (; k0 + kLanes <= k_dim; k0 += kLanes) {
    vf acc = Splat(0.0f);
    for (int64_t j = lo; j < hi; ++j) acc += Splat(p[j]) * Load(values + j * k_dim + k0);
    Store(out + k0, acc * inv_total);
  }
  for (; k0 < k_dim; ++k0) {
    float acc = 0.0f;
    for (int64_t j = lo; j < hi; ++j) acc += p[j] * values[j * k_dim + k0];
    out[k0] = acc * inv_total;
  }
}

// `bias` (or null): [N, R, S], added to the scaled logits.
ffi::Error Decode(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& keys,
                  ffi::Buffer<ffi::F32>& values, ffi::Buffer<ffi::PRED>& allowed,
                  const float* bias, ffi::ResultBuffer<ffi::F32>& out, float scale) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions(),
             md = allowed.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 2 || qd[0] != kd[0] ||
      vd[0] != kd[0] || qd[2] != kd[1] || vd[1] != kd[2] || vd[2] != kd[1] ||
      md[1] != kd[2] || md[0] < 1 || kd[0] % md[0] != 0) {
    return ffi::Error::InvalidArgument(
        "need q [N, R, K], keys [N, K, S], values [N, S, K], allowed [B, S], B dividing N");
  }
  const int64_t n = kd[0], r = qd[1], k_dim = kd[1], s = kd[2], groups = n / md[0];
  const float* Q = q.typed_data();
  const float* KEYS = keys.typed_data();
  const float* VALUES = values.typed_data();
  const uint8_t* M = reinterpret_cast<const uint8_t*>(allowed.typed_data());
  float* O = out->typed_data();
  ParallelFor(pool, n, [&](int64_t i) {
    const uint8_t* m = M + (i / groups) * s;
    int64_t lo, hi;
    AllowedSpan(m, s, &lo, &hi);
    float* logits = Scratch(0, s);
    for (int64_t h = 0; h < r; ++h) {
      float* o = O + (i * r + h) * k_dim;
      if (lo == hi) {
        std::fill(o, o + k_dim, 0.0f);
        continue;
      }
      Logits(Q + (i * r + h) * k_dim, KEYS + i * k_dim * s, k_dim, s, lo, hi, scale, logits);
      if (bias != nullptr) {
        const float* row = bias + (i * r + h) * s;
        for (int64_t j = lo; j < hi; ++j) logits[j] += row[j];
      }
      float mx = -std::numeric_limits<float>::infinity();
      bool holes = false;  // masked keys inside the span (padding): -inf, then exactly 0
      for (int64_t j = lo; j < hi; ++j) {
        holes |= !m[j];
        logits[j] = m[j] ? logits[j] : -std::numeric_limits<float>::infinity();
        mx = logits[j] > mx ? logits[j] : mx;
      }
      const float total = ExpSum(logits + lo, hi - lo, mx, logits + lo);
      if (holes) {  // (ExpNonPositive leaves e^-87 where a -inf was)
        for (int64_t j = lo; j < hi; ++j) logits[j] = m[j] ? logits[j] : 0.0f;
      }
      WeightedValues(logits, VALUES + i * s * k_dim, k_dim, lo, hi, 1.0f / total, o);
    }
  });
  return ffi::Error::Success();
}

// `bias`: a logit bias [N, R, S] added after the scale (T5's relative positions), or an
// empty array for none.
ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                               ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::F32> bias,
                               ffi::ResultBuffer<ffi::F32> out, float scale) {
  if (bias.element_count() == 0) {
    return Decode(pool, q, keys, values, allowed, nullptr, out, scale);
  }
  const auto qd = q.dimensions(), bd = bias.dimensions(), kd = keys.dimensions();
  if (bd.size() != 3 || qd.size() != 3 || kd.size() != 3 || bd[0] != qd[0] ||
      bd[1] != qd[1] || bd[2] != kd[2]) {
    return ffi::Error::InvalidArgument("need a logit bias [N, R, S] or an empty array");
  }
  return Decode(pool, q, keys, values, allowed, bias.typed_data(), out, scale);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
