// Pieces shared by the attention kernels' forward (attention_cpu.cc) and backward
// (attention_bwd_cpu.cc) passes: dimensions and row layouts, packing a head into tiles,
// the register-blocked products, blocks of query rows with their allowed key ranges,
// and the handlers' operand bindings. See attention_cpu.cc for the layouts.

#pragma once

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
  if (transposed) {  // keys x features through 8 x 8 register blocks
    TransposeRows(X, stride, 0, d.s, d.k, tile, sp);
    for (int64_t c = 0; c < d.k; ++c) std::fill(tile + c * sp + d.s, tile + (c + 1) * sp, 0.0f);
    std::fill(tile + d.k * sp, tile + kp * sp, 0.0f);
    return;
  }
  for (int64_t s = 0; s < d.s; ++s) {
    std::memcpy(tile + s * kp, X + stride * s, d.k * sizeof(float));
    std::fill(tile + s * kp + d.k, tile + (s + 1) * kp, 0.0f);
  }
  std::fill(tile + d.s * kp, tile + sp * kp, 0.0f);
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

Dims SeparateDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return {qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]};
}

// qkv [B, L, H + 2G, K] with H = `heads` query heads (self-attention: S = L).
Dims PackedDims(ffi::Buffer<ffi::F32>& qkv, int64_t heads) {
  auto x = qkv.dimensions();
  return {x[0], x[1], x[1], heads, (x[2] - heads) / 2, x[3]};
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
