// Attention on the CPU as XLA FFI custom calls (lm/kernels/attention.py builds and
// registers them): softmax(scale * q k^T, masked) v with and without its probabilities
// (training / no gradient), and its backward pass.
//
// Layouts are the model's own: q [B, L, H, K], k and v [B, S, G, K] (G key/value heads,
// H = R * G query heads), or for self-attention the packed projection [B, L, H + 2G, K]
// (q, k, v heads side by side, as one product computes them; the `Packed` handlers read
// it in place and write its gradient in the same layout, so neither side is sliced or
// concatenated); the mask a bool table [B, L, S], the probabilities [B, H, L, S] (saved
// for the backward pass), the output [B, L, H, K]. One task per (row, head) in
// the forward pass and per (row, key/value head) in the backward pass (so the R query
// heads that share a key/value head accumulate its gradient without races), spread over
// XLA's intra-op thread pool. Each task copies its head into small contiguous tiles and
// only touches the columns between a query's first and last allowed key (causal masks:
// half the work), 4 query rows x 16 (AVX-512) or 8 (AVX2) keys or features at a time in
// registers. A row with no allowed key gets zero probabilities and a zero output.

#include "cpu_common.h"

namespace {

struct Dims {
  int64_t b, l, s, h, g, k;
};

// Where each head's row lies: q heads at ((b L + i) qc + qo + h) K, key and value heads at
// ((b S + s) kc + ko + g) K and ((b S + s) vc + vo + g) K. Separate arrays: qc = H, kc =
// vc = G, offsets 0; the packed projection [B, L, H + 2G, K]: qc = kc = vc = H + 2G, qo = 0,
// ko = H, vo = H + G. Gradients are written in the layout of their inputs.
struct Layout {
  int64_t qc, qo, kc, ko, vc, vo;
  int64_t Q(const Dims& d, int64_t b, int64_t i, int64_t h) const {
    return ((b * d.l + i) * qc + qo + h) * d.k;
  }
  int64_t K(const Dims& d, int64_t b, int64_t s, int64_t g) const {
    return ((b * d.s + s) * kc + ko + g) * d.k;
  }
  int64_t V(const Dims& d, int64_t b, int64_t s, int64_t g) const {
    return ((b * d.s + s) * vc + vo + g) * d.k;
  }
};

Layout Separate(const Dims& d) { return {d.h, 0, d.g, 0, d.g, 0}; }

Layout Packed(const Dims& d) {
  const int64_t c = d.h + 2 * d.g;
  return {c, 0, c, d.h, c, d.h + d.g};
}

inline int64_t RoundUp(int64_t x) { return (x + kLanes - 1) / kLanes * kLanes; }

constexpr int kRows = 4;  // query rows per block: 4 x 2 vector accumulators in registers

// One key/value head packed into a [rows_p, cols_p] tile, zero-padded: `transposed`
// puts a key's features down a column (tile[c][s]), else along a row (tile[s][c]). Key
// s of the head starts at X + stride * s (X: the head's first key).
void PackHead(const Dims& d, const float* X, int64_t stride, bool transposed, float* tile,
              int64_t sp, int64_t kp) {
  int64_t s = 0;
  if (transposed) {  // 8 keys x 8 features at a time through registers
    const int64_t k8 = d.k / 8 * 8;
    for (; s + 8 <= d.s; s += 8) {
      for (int64_t c = 0; c < k8; c += 8)
        Transpose8x8(X + stride * s + c, stride, tile + c * sp + s, sp);
      for (int64_t c = k8; c < d.k; ++c)
        for (int64_t i = s; i < s + 8; ++i) tile[c * sp + i] = X[stride * i + c];
    }
  }
  for (; s < d.s; ++s) {
    const float* xs = X + stride * s;
    if (transposed) {
      for (int64_t c = 0; c < d.k; ++c) tile[c * sp + s] = xs[c];
    } else {
      std::memcpy(tile + s * kp, xs, d.k * sizeof(float));
      std::fill(tile + s * kp + d.k, tile + (s + 1) * kp, 0.0f);
    }
  }
  if (transposed) {
    for (int64_t c = 0; c < d.k; ++c) std::fill(tile + c * sp + d.s, tile + (c + 1) * sp, 0.0f);
    std::fill(tile + d.k * sp, tile + kp * sp, 0.0f);
  } else {
    std::fill(tile + d.s * kp, tile + sp * kp, 0.0f);
  }
}

// Column ranges [lo, hi) below are multiples of kLanes inside buffers padded to sp.

// out[r][j] = scale[r] sum_{t in [t0, t1)} a[r][t] * b[t][j] for kRows rows and the
// columns j in [j0, j1) (multiples of kLanes), with kRows x N vectors of accumulators in
// registers (N = 2: eight independent FMA chains, enough to hide the FMA latency; N = 4 for
// a whole 64-key row with AVX-512; N = 1 for an odd tail). Rows of a, b and out are
// a_stride, b_stride and out_stride floats apart; only the first `rows` rows are stored,
// each times scale[r] (no scaling when `scale` is null).
template <int N>
inline void BlockProductN(const float* a, int64_t a_stride, const float* b, int64_t b_stride,
                          int64_t t0, int64_t t1, int64_t j, float* out, int64_t out_stride,
                          const float* scale, int64_t rows) {
  vf acc[kRows][N] = {};
  for (int64_t t = t0; t < t1; ++t) {
    vf col[N];
    for (int n = 0; n < N; ++n) col[n] = Load(b + t * b_stride + j + n * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float x = a[r * a_stride + t];
      for (int n = 0; n < N; ++n) acc[r][n] += x * col[n];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    for (int n = 0; n < N; ++n)
      Store(out + r * out_stride + j + n * kLanes, scale ? acc[r][n] * scale[r] : acc[r][n]);
  }
}

inline void BlockProduct(const float* a, int64_t a_stride, const float* b, int64_t b_stride,
                         int64_t t0, int64_t t1, int64_t j0, int64_t j1, float* out,
                         int64_t out_stride, const float* scale = nullptr,
                         int64_t rows = kRows) {
  int64_t j = j0;
  if (kLanes == 16)  // 16 accumulators + 4 columns fit AVX-512's 32 registers, not AVX2's 16
    for (; j + 4 * kLanes <= j1; j += 4 * kLanes)
      BlockProductN<4>(a, a_stride, b, b_stride, t0, t1, j, out, out_stride, scale, rows);
  for (; j + 2 * kLanes <= j1; j += 2 * kLanes)
    BlockProductN<2>(a, a_stride, b, b_stride, t0, t1, j, out, out_stride, scale, rows);
  if (j < j1) BlockProductN<1>(a, a_stride, b, b_stride, t0, t1, j, out, out_stride, scale, rows);
}

// out[r][lo..hi) = sum_c a[r][c] * bt[c][lo..hi) (a: [kRows, kp], bt: [kp, sp]): logits.
inline void RowsTimesColumns(const float* a, int64_t kp, const float* bt, int64_t sp,
                             int64_t lo, int64_t hi, float* out) {
  BlockProduct(a, kp, bt, sp, 0, kp, lo, hi, out, sp);
}

// out[r][0..kp) = sum_{s in [lo, hi)} w[r][s] * rows[s][0..kp) (w: [kRows, sp], rows
// `stride` floats apart).
inline void WeightsTimesRows(const float* w, int64_t sp, const float* rows, int64_t stride,
                             int64_t kp, int64_t lo, int64_t hi, float* out) {
  BlockProduct(w, sp, rows, stride, lo, hi, 0, kp, out, kp);
}

// acc[s][0..kp) += sum_r w[r][s] * x[r][0..kp) for s in [lo, hi) (the transposed products
// behind the gradients of keys and values).
inline void AccumulateTransposed(const float* w, int64_t sp, const float* x, int64_t kp,
                                 int64_t lo, int64_t hi, float* acc) {
  for (int64_t c0 = 0; c0 < kp; c0 += kLanes) {
    const vf x0 = Load(x + c0), x1 = Load(x + kp + c0), x2 = Load(x + 2 * kp + c0),
              x3 = Load(x + 3 * kp + c0);
    for (int64_t s = lo; s < hi; ++s) {
      float* a = acc + s * kp + c0;
      Store(a, Load(a) + w[s] * x0 + w[sp + s] * x1 + w[2 * sp + s] * x2 + w[3 * sp + s] * x3);
    }
  }
}

// A block of kRows query rows of one (batch row, head): a pointer to each row's mask
// (sp bytes: the input row itself when S is a multiple of kLanes, else a zero-padded copy; a
// row of zeros past L) and the union of their allowed key ranges.
struct RowBlock {
  int64_t rows, lo, hi;  // lo, hi multiples of kLanes; lo >= hi: no allowed key
  const uint8_t* mask[kRows];

  RowBlock(const Dims& d, const uint8_t* allowed, const int32_t* ranges, int64_t b,
           int64_t i0, int64_t sp, uint8_t* pad_buffer)
      : rows(std::min<int64_t>(kRows, d.l - i0)), lo(sp), hi(0) {
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = b * d.l + i0 + r;
      uint8_t* pad = pad_buffer + r * sp;
      if (r >= rows) {
        std::fill(pad, pad + sp, 0);
        mask[r] = pad;
        continue;
      }
      if (d.s == sp) {
        mask[r] = allowed + row * d.s;
      } else {
        std::memcpy(pad, allowed + row * d.s, d.s);
        std::fill(pad + d.s, pad + sp, 0);
        mask[r] = pad;
      }
      if (ranges[2 * row] < ranges[2 * row + 1]) {
        lo = std::min<int64_t>(lo, ranges[2 * row]);
        hi = std::max<int64_t>(hi, ranges[2 * row + 1]);
      }
    }
    lo = lo / kLanes * kLanes;
    hi = RoundUp(hi);
  }
};

// [first allowed key, last allowed key + 1) of every query row ([B * L, 2]), once per
// call (not once per head).
std::vector<int32_t> AllowedRanges(const Dims& d, const uint8_t* allowed) {
  std::vector<int32_t> ranges(2 * d.b * d.l);
  for (int64_t row = 0; row < d.b * d.l; ++row) {
    const uint8_t* m = allowed + row * d.s;
    int64_t a = 0, z = d.s;
    uint64_t word;  // 8 mask bytes at a time (little-endian: byte i is bits 8i..8i+7)
    for (; a + 8 <= z; a += 8) {
      std::memcpy(&word, m + a, 8);
      if (word) {
        a += __builtin_ctzll(word) / 8;
        break;
      }
    }
    while (a < z && !m[a]) ++a;
    for (; z - 8 >= a; z -= 8) {
      std::memcpy(&word, m + z - 8, 8);
      if (word) {
        z -= __builtin_clzll(word) / 8;
        break;
      }
    }
    while (z > a && !m[z - 1]) --z;
    ranges[2 * row] = static_cast<int32_t>(a);
    ranges[2 * row + 1] = static_cast<int32_t>(z);
  }
  return ranges;
}

// Softmax of the logits rows p[r][lo..hi) over their allowed keys (the others get 0; a
// row with none gets all zeros).
typedef uint8_t vb __attribute__((vector_size(kLanes)));

// Lanes whose mask byte is non-zero (all bits set) or zero. GCC scalarises the generic
// byte-to-int conversion (one insert per lane), so x86 builds widen with one instruction.
inline vi Allowed(const uint8_t* m) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m))) != 0;
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m))) != 0;
#else
  vb bytes;
  std::memcpy(&bytes, m, sizeof(bytes));
  return __builtin_convertvector(bytes, vi) != 0;
#endif
}

// exp(scale logit - row max) over each row's allowed keys in p[r][lo..hi) (0 elsewhere), the
// kRows rows interleaved (independent dependency chains); inv[r] = 1 / the row's sum (0
// for a row with no allowed key). The caller normalises (rows of p and of p v).
inline void MaskedExp(float* p, const uint8_t* const* mask, int64_t sp, int64_t lo, int64_t hi,
                      float scale, float* inv) {
  vf mx[kRows], sum[kRows];
  for (int r = 0; r < kRows; ++r) {
    mx[r] = Splat(-3.0e38f);
    sum[r] = Splat(0.0f);
  }
  for (int64_t s = lo; s < hi; s += kLanes)
    for (int r = 0; r < kRows; ++r) {
      const vf x = Allowed(mask[r] + s) ? Load(p + r * sp + s) * scale : Splat(-3.0e38f);
      mx[r] = x > mx[r] ? x : mx[r];
    }
  float top[kRows];
  for (int r = 0; r < kRows; ++r) top[r] = HorizontalMax(mx[r]);
  for (int64_t s = lo; s < hi; s += kLanes)
    for (int r = 0; r < kRows; ++r) {
      float* x = p + r * sp + s;
      const vf e = Allowed(mask[r] + s) ? ExpNonPositive(Load(x) * scale - top[r]) : Splat(0.0f);
      Store(x, e);
      sum[r] += e;
    }
  for (int r = 0; r < kRows; ++r) {
    const float total = HorizontalSum(sum[r]);
    inv[r] = total > 0.0f ? 1.0f / total : 0.0f;
  }
}

inline float Dot(const float* x, const float* y, int64_t lo, int64_t hi) {
  vf acc{};
  for (int64_t s = lo; s < hi; s += kLanes) acc += Load(x + s) * Load(y + s);
  return HorizontalSum(acc);
}

// The forward pass; the probabilities are written to P unless it is null (no gradient).
// Where the head width is a multiple of kLanes (no padding), query rows and values are
// read in place and each output row is written straight from the registers; the logits
// are scaled inside the softmax.
void Forward(ffi::ThreadPool& pool, const Dims& d, const Layout& lay, const float* Q,
             const float* K, const float* V, ffi::Buffer<ffi::PRED>& allowed, float scale,
             float* O, float* P) {
  const uint8_t* A = reinterpret_cast<const uint8_t*>(allowed.typed_data());
  const int64_t r = d.h / d.g, sp = RoundUp(d.s), kp = RoundUp(d.k);
  const bool in_place = kp == d.k;
  const std::vector<int32_t> ranges = AllowedRanges(d, A);
  ParallelFor(pool, d.b * d.h, [&](int64_t task) {
    const int64_t b = task / d.h, h = task % d.h;
    float* kt = Scratch(0, kp * sp);
    float* vv = Scratch(1, sp * kp);
    float* qs = Scratch(2, kRows * kp);
    float* p = Scratch(3, kRows * sp);
    float* o = Scratch(4, kRows * kp);
    uint8_t* mask = reinterpret_cast<uint8_t*>(Scratch(5, kRows * sp / 4));  // bytes
    PackHead(d, K + lay.K(d, b, 0, h / r), lay.kc * d.k, true, kt, sp, kp);
    const float* values = vv;
    int64_t v_stride = kp;
    if (in_place) {
      values = V + lay.V(d, b, 0, h / r);
      v_stride = lay.vc * d.k;
    } else {
      PackHead(d, V + lay.V(d, b, 0, h / r), lay.vc * d.k, false, vv, sp, kp);
    }
    const int64_t q_stride = lay.qc * d.k, o_stride = d.h * d.k;
    for (int64_t i0 = 0; i0 < d.l; i0 += kRows) {
      const RowBlock blk(d, A, ranges.data(), b, i0, sp, mask);
      float* out = O + ((b * d.l + i0) * d.h + h) * d.k;
      if (blk.lo >= blk.hi) {  // no allowed key in the block: zeros
        for (int64_t j = 0; j < blk.rows; ++j)
          std::fill(out + j * o_stride, out + j * o_stride + d.k, 0.0f);
        if (P != nullptr)
          for (int64_t j = 0; j < blk.rows; ++j) {
            float* pj = P + ((b * d.h + h) * d.l + i0 + j) * d.s;
            std::fill(pj, pj + d.s, 0.0f);
          }
        continue;
      }
      const float* qrows = Q + lay.Q(d, b, i0, h);
      int64_t qr_stride = q_stride;
      if (!in_place || blk.rows < kRows) {  // a zero-padded copy
        for (int64_t j = 0; j < kRows; ++j) {
          float* qj = qs + j * kp;
          if (j < blk.rows) std::memcpy(qj, qrows + j * q_stride, d.k * sizeof(float));
          else std::fill(qj, qj + d.k, 0.0f);
          std::fill(qj + d.k, qj + kp, 0.0f);
        }
        qrows = qs;
        qr_stride = kp;
      }
      float inv[kRows];
      BlockProduct(qrows, qr_stride, kt, sp, 0, kp, blk.lo, blk.hi, p, sp);
      MaskedExp(p, blk.mask, sp, blk.lo, blk.hi, scale, inv);
      if (in_place) {
        BlockProduct(p, sp, values, v_stride, blk.lo, blk.hi, 0, kp, out, o_stride, inv, blk.rows);
      } else {
        WeightsTimesRows(p, sp, values, v_stride, kp, blk.lo, blk.hi, o);
        for (int64_t j = 0; j < blk.rows; ++j)
          for (int64_t c = 0; c < d.k; ++c) out[j * o_stride + c] = o[j * kp + c] * inv[j];
      }
      if (P == nullptr) continue;
      const int64_t lo = std::min(blk.lo, d.s), hi = std::max(lo, std::min(blk.hi, d.s));
      for (int64_t j = 0; j < blk.rows; ++j) {
        float* pj = P + ((b * d.h + h) * d.l + i0 + j) * d.s;
        const float* src = p + j * sp;
        std::fill(pj, pj + lo, 0.0f);
        int64_t s = lo;
        const vf w = Splat(inv[j]);
        for (; s + kLanes <= hi; s += kLanes) Store(pj + s, Load(src + s) * w);
        for (; s < hi; ++s) pj[s] = src[s] * inv[j];
        std::fill(pj + hi, pj + d.s, 0.0f);
      }
    }
  });
}

Dims SeparateDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return {qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]};
}

// qkv [B, L, H + 2G, K] with H = `heads` query heads (self-attention: S = L).
Dims PackedDims(ffi::Buffer<ffi::F32>& qkv, int64_t heads) {
  auto x = qkv.dimensions();
  return {x[0], x[1], x[1], heads, (x[2] - heads) / 2, x[3]};
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed, float scale,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs) {
  const Dims d = SeparateDims(q, k);
  Forward(pool, d, Separate(d), q.typed_data(), k.typed_data(), v.typed_data(), allowed, scale,
          out->typed_data(), probs->typed_data());
  return ffi::Error::Success();
}

ffi::Error InferenceImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed, float scale,
                         ffi::ResultBuffer<ffi::F32> out) {
  const Dims d = SeparateDims(q, k);
  Forward(pool, d, Separate(d), q.typed_data(), k.typed_data(), v.typed_data(), allowed, scale,
          out->typed_data(), nullptr);
  return ffi::Error::Success();
}

ffi::Error PackedForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                             ffi::Buffer<ffi::PRED> allowed, float scale, int64_t heads,
                             ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs) {
  const Dims d = PackedDims(qkv, heads);
  const float* x = qkv.typed_data();
  Forward(pool, d, Packed(d), x, x, x, allowed, scale, out->typed_data(), probs->typed_data());
  return ffi::Error::Success();
}

ffi::Error PackedInferenceImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                               ffi::Buffer<ffi::PRED> allowed, float scale, int64_t heads,
                               ffi::ResultBuffer<ffi::F32> out) {
  const Dims d = PackedDims(qkv, heads);
  const float* x = qkv.typed_data();
  Forward(pool, d, Packed(d), x, x, x, allowed, scale, out->typed_data(), nullptr);
  return ffi::Error::Success();
}

// [rows, cols] (row stride ld_src) -> [cols, rows] (row stride ld_dst): 8 x 8 blocks in
// registers, the edges element by element.
void TransposeTile(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
                   int64_t ld_dst) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t i = 0; i < r8; i += 8)
    for (int64_t c = 0; c < c8; c += 8)
      Transpose8x8(src + i * ld_src + c, ld_src, dst + c * ld_dst + i, ld_dst);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = i < r8 ? c8 : 0; c < cols; ++c) dst[c * ld_dst + i] = src[i * ld_src + c];
}

// out_t[c][s] += sum_{i in [i0, i1)} w[i][s] x[i][c] for the kLanes keys s from s0 and the
// F features c from c0: one vector of keys per feature in registers, w's rows read as
// vectors and x's elements broadcast (the transposed products behind dK and dV, without
// transposing dS or P).
template <int F>
inline void ColumnProduct(const float* w, int64_t w_stride, const float* x, int64_t x_stride,
                          int64_t i0, int64_t i1, int64_t s0, int64_t c0, float* out_t,
                          int64_t out_stride) {
  vf acc[F];
  for (int f = 0; f < F; ++f) acc[f] = Load(out_t + (c0 + f) * out_stride + s0);
  for (int64_t i = i0; i < i1; ++i) {
    const vf wv = Load(w + i * w_stride + s0);
    const float* xi = x + i * x_stride + c0;
    for (int f = 0; f < F; ++f) acc[f] += xi[f] * wv;
  }
  for (int f = 0; f < F; ++f) Store(out_t + (c0 + f) * out_stride + s0, acc[f]);
}

// The backward pass where neither the head width nor the key count needs padding (both
// multiples of kLanes): every row is read where it lies. Per (row, key/value head) and
// each of its query heads, by blocks of kRows query rows: dP = dO Vᵀ, dS = P (dP -
// rowsum(P dP)) scale (kept for the whole head), dQ = dS K written straight to DQ; then
// dKᵀ += dSᵀ Q and dVᵀ += Pᵀ dO by vectors of kLanes keys, each only over the query rows
// from the first one that attends to it; dK and dV transposed into place once.
void BackwardInPlace(ffi::ThreadPool& pool, const Dims& d, const Layout& lay, const float* Q,
                     const float* K, const float* V, const uint8_t* A, const float* P,
                     const float* DO, float scale, float* DQ, float* DK, float* DV) {
  constexpr int F = kLanes;  // features per ColumnProduct: F + 1 vectors in registers
  const int64_t r = d.h / d.g, sp = d.s, kp = d.k, lp = (d.l + kRows - 1) / kRows * kRows;
  const std::vector<int32_t> ranges = AllowedRanges(d, A);
  ParallelFor(pool, d.b * d.g, [&](int64_t task) {
    const int64_t b = task / d.g, g = task % d.g;
    float* vt = Scratch(0, kp * sp);
    float* dk_t = Scratch(1, kp * sp);
    float* dv_t = Scratch(2, kp * sp);
    float* ds_all = Scratch(3, lp * sp);
    float* dos = Scratch(4, kRows * kp);
    float* p = Scratch(5, kRows * sp);
    uint8_t* mask = reinterpret_cast<uint8_t*>(Scratch(9, kRows * sp / 4));  // bytes
    PackHead(d, V + lay.V(d, b, 0, g), lay.vc * d.k, true, vt, sp, kp);
    const float* krows = K + lay.K(d, b, 0, g);
    const int64_t k_stride = lay.kc * d.k, q_stride = lay.qc * d.k, do_stride = d.h * d.k;
    std::fill(dk_t, dk_t + kp * sp, 0.0f);
    std::fill(dv_t, dv_t + kp * sp, 0.0f);
    // The first query row attending to each vector of keys (the same for every head).
    std::vector<int64_t> first_row(sp / kLanes, d.l);
    for (int64_t i0 = 0; i0 < d.l; i0 += kRows) {
      const RowBlock blk(d, A, ranges.data(), b, i0, sp, mask);
      for (int64_t s0 = blk.lo; s0 < blk.hi; s0 += kLanes)
        first_row[s0 / kLanes] = std::min(first_row[s0 / kLanes], i0);
    }
    for (int64_t h = g * r; h < (g + 1) * r; ++h) {
      const float* p_head = P + (b * d.h + h) * d.l * d.s;
      const float* do_head = DO + (b * d.l * d.h + h) * d.k;
      for (int64_t i0 = 0; i0 < d.l; i0 += kRows) {
        const RowBlock blk(d, A, ranges.data(), b, i0, sp, mask);
        float* ds = ds_all + i0 * sp;
        float* dq = DQ + lay.Q(d, b, i0, h);
        if (blk.lo >= blk.hi) {  // no allowed key: dS and dQ zero
          std::fill(ds, ds + kRows * sp, 0.0f);
          for (int64_t j = 0; j < blk.rows; ++j)
            std::fill(dq + j * q_stride, dq + j * q_stride + d.k, 0.0f);
          continue;
        }
        const float* do_rows = do_head + i0 * do_stride;
        const float* p_rows = p_head + i0 * d.s;
        int64_t dr_stride = do_stride;
        if (blk.rows < kRows) {  // the last, partial block: zero-padded copies
          for (int64_t j = 0; j < kRows; ++j) {
            if (j < blk.rows) {
              std::memcpy(dos + j * kp, do_rows + j * do_stride, kp * sizeof(float));
              std::memcpy(p + j * sp, p_rows + j * d.s, sp * sizeof(float));
            } else {
              std::fill(dos + j * kp, dos + (j + 1) * kp, 0.0f);
              std::fill(p + j * sp, p + (j + 1) * sp, 0.0f);
            }
          }
          do_rows = dos;
          dr_stride = kp;
          p_rows = p;
        }
        BlockProduct(do_rows, dr_stride, vt, sp, 0, kp, blk.lo, blk.hi, ds, sp);
        for (int j = 0; j < kRows; ++j) {
          float* dsj = ds + j * sp;
          const float* pj = p_rows + j * sp;
          const float dot = Dot(pj, dsj, blk.lo, blk.hi);
          for (int64_t s = blk.lo; s < blk.hi; s += kLanes)
            Store(dsj + s, Load(pj + s) * (Load(dsj + s) - dot) * scale);
          std::fill(dsj, dsj + blk.lo, 0.0f);
          std::fill(dsj + blk.hi, dsj + sp, 0.0f);
        }
        BlockProduct(ds, sp, krows, k_stride, blk.lo, blk.hi, 0, kp, dq, q_stride, nullptr,
                     blk.rows);
      }
      const float* q_head = Q + lay.Q(d, b, 0, h);
      for (int64_t s0 = 0; s0 < sp; s0 += kLanes) {
        const int64_t i0 = first_row[s0 / kLanes];
        for (int64_t c0 = 0; c0 < kp && i0 < d.l; c0 += F) {
          ColumnProduct<F>(ds_all, sp, q_head, q_stride, i0, d.l, s0, c0, dk_t, sp);
          ColumnProduct<F>(p_head, d.s, do_head, do_stride, i0, d.l, s0, c0, dv_t, sp);
        }
      }
    }
    TransposeTile(dk_t, sp, d.k, d.s, DK + lay.K(d, b, 0, g), lay.kc * d.k);
    TransposeTile(dv_t, sp, d.k, d.s, DV + lay.V(d, b, 0, g), lay.vc * d.k);
  });
}

// The gradients of q, k and v, written in `lay` like their inputs (every element once).
void Backward(ffi::ThreadPool& pool, const Dims& d, const Layout& lay, const float* Q,
              const float* K, const float* V, ffi::Buffer<ffi::PRED>& allowed, const float* P,
              const float* DO, float scale, float* DQ, float* DK, float* DV) {
  const uint8_t* A = reinterpret_cast<const uint8_t*>(allowed.typed_data());
  if (d.k % kLanes == 0 && d.s % kLanes == 0 && d.s > 0)
    return BackwardInPlace(pool, d, lay, Q, K, V, A, P, DO, scale, DQ, DK, DV);
  const int64_t r = d.h / d.g, sp = RoundUp(d.s), kp = RoundUp(d.k);
  const std::vector<int32_t> ranges = AllowedRanges(d, A);
  ParallelFor(pool, d.b * d.g, [&](int64_t task) {
    const int64_t b = task / d.g, g = task % d.g;
    float* vt = Scratch(0, kp * sp);
    float* kk = Scratch(1, sp * kp);
    float* dk_acc = Scratch(2, sp * kp);
    float* dv_acc = Scratch(3, sp * kp);
    float* qs = Scratch(4, kRows * kp);
    float* dos = Scratch(5, kRows * kp);
    float* p = Scratch(6, kRows * sp);
    float* ds = Scratch(7, kRows * sp);
    float* dqs = Scratch(8, kRows * kp);
    uint8_t* mask = reinterpret_cast<uint8_t*>(Scratch(9, kRows * sp / 4));  // bytes
    PackHead(d, V + lay.V(d, b, 0, g), lay.vc * d.k, true, vt, sp, kp);
    PackHead(d, K + lay.K(d, b, 0, g), lay.kc * d.k, false, kk, sp, kp);
    std::fill(dk_acc, dk_acc + sp * kp, 0.0f);
    std::fill(dv_acc, dv_acc + sp * kp, 0.0f);
    std::fill(qs, qs + kRows * kp, 0.0f);  // the feature padding [K, kp) stays zero
    std::fill(dos, dos + kRows * kp, 0.0f);
    for (int64_t h = g * r; h < (g + 1) * r; ++h) {
      for (int64_t i0 = 0; i0 < d.l; i0 += kRows) {
        const RowBlock blk(d, A, ranges.data(), b, i0, sp, mask);
        if (blk.lo < blk.hi) {
          const int64_t hi_s = std::max(blk.lo, std::min(blk.hi, d.s));
          for (int64_t j = 0; j < kRows; ++j) {
            const int64_t row = (b * d.l + i0 + j) * d.h + h;  // of dout [B, L, H, K]
            const bool real = j < blk.rows;
            if (real) {
              std::memcpy(qs + j * kp, Q + lay.Q(d, b, i0 + j, h), d.k * sizeof(float));
              std::memcpy(dos + j * kp, DO + row * d.k, d.k * sizeof(float));
            } else {
              std::fill(qs + j * kp, qs + (j + 1) * kp, 0.0f);
              std::fill(dos + j * kp, dos + (j + 1) * kp, 0.0f);
            }
            float* pj = p + j * sp;
            if (real && blk.lo < hi_s)
              std::memcpy(pj + blk.lo, P + ((b * d.h + h) * d.l + i0 + j) * d.s + blk.lo,
                          (hi_s - blk.lo) * sizeof(float));
            std::fill(pj + (real ? hi_s : blk.lo), pj + blk.hi, 0.0f);
          }
          // dlogits = p * (dp - sum(p * dp)) * scale, dp = dout v^T.
          RowsTimesColumns(dos, kp, vt, sp, blk.lo, blk.hi, ds);
          for (int j = 0; j < kRows; ++j) {
            float* dsj = ds + j * sp;
            const float* pj = p + j * sp;
            const float dot = Dot(pj, dsj, blk.lo, blk.hi);
            for (int64_t s = blk.lo; s < blk.hi; s += kLanes)
              Store(dsj + s, Load(pj + s) * (Load(dsj + s) - dot) * scale);
          }
          WeightsTimesRows(ds, sp, kk, kp, kp, blk.lo, blk.hi, dqs);
          AccumulateTransposed(ds, sp, qs, kp, blk.lo, blk.hi, dk_acc);
          AccumulateTransposed(p, sp, dos, kp, blk.lo, blk.hi, dv_acc);
        } else {
          std::fill(dqs, dqs + kRows * kp, 0.0f);
        }
        for (int64_t j = 0; j < blk.rows; ++j)
          std::memcpy(DQ + lay.Q(d, b, i0 + j, h), dqs + j * kp, d.k * sizeof(float));
      }
    }
    for (int64_t s = 0; s < d.s; ++s) {
      std::memcpy(DK + lay.K(d, b, s, g), dk_acc + s * kp, d.k * sizeof(float));
      std::memcpy(DV + lay.V(d, b, s, g), dv_acc + s * kp, d.k * sizeof(float));
    }
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed,
                        ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> dout, float scale,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = SeparateDims(q, k);
  Backward(pool, d, Separate(d), q.typed_data(), k.typed_data(), v.typed_data(), allowed,
           probs.typed_data(), dout.typed_data(), scale, dq->typed_data(), dk->typed_data(),
           dv->typed_data());
  return ffi::Error::Success();
}

ffi::Error PackedBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                              ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::F32> probs,
                              ffi::Buffer<ffi::F32> dout, float scale, int64_t heads,
                              ffi::ResultBuffer<ffi::F32> dqkv) {
  const Dims d = PackedDims(qkv, heads);
  const float* x = qkv.typed_data();
  float* dx = dqkv->typed_data();
  Backward(pool, d, Packed(d), x, x, x, allowed, probs.typed_data(), dout.typed_data(), scale,
           dx, dx, dx);
  return ffi::Error::Success();
}

// The handlers' leading operands: q, k, v and the mask table (separate arrays), or the
// packed projection and the mask table.
auto SeparateBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>();
}

auto PackedBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionForward, ForwardImpl,
                              SeparateBinding()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionInference, InferenceImpl,
                              SeparateBinding()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionBackward, BackwardImpl,
                              SeparateBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionPackedForward, PackedForwardImpl,
                              PackedBinding()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionPackedInference, PackedInferenceImpl,
                              PackedBinding()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionPackedBackward, PackedBackwardImpl,
                              PackedBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>());
