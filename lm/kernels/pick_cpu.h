// The pick kernels' shared pieces (pick_cpu.cc, top_k_cpu.cc): approximate logits from the
// int8 copy of the table with each row's largest lower bound, exact fp32 logits with the
// logits kernel's tiles, and the hidden rows' norms (lm/kernels/pick.py).

#pragma once

#include <cmath>

#include "logits_cpu.h"

namespace {

#if defined(__AVX512F__) || defined(__AVX2__)  // the logits kernel's tiles
// ---------------------------------------------------------------- approximate logits

// approx[i, v] = scale[v] * (x_i . q_v) for the kLanes table rows from v, h rows [m, m + G)
// at G per tile (lane i * P + p: h row m + i, table row p); `low` keeps, lane-wise, the
// largest approx - ||x|| radius seen (a NaN approximate logit leaves it as it was; the
// caller's finiteness checks catch it).
template <int G>
inline void QuantBlock(const float* H, const int8_t* Q, const float* S, const float* R,
                       const float* nx, int64_t d, int64_t vocab, int64_t m, int64_t v,
                       float* A, vf& low) {
  constexpr int P = kLanes / G;
  vf norms;
  for (int j = 0; j < kLanes; ++j) norms[j] = nx[m + j / P];
  for (int t = 0; t < kLanes / P; ++t) {
    const int64_t v0 = v + t * P;
    float sums[kLanes];
    Tile<G>(H + m * d, Q + v0 * d, d, sums, P);  // sums[i * P + p]
    vf scale, radius;
    for (int j = 0; j < kLanes; ++j) {
      scale[j] = S[v0 + j % P];
      radius[j] = R[v0 + j % P];
    }
    const vf a = Load(sums) * scale;
    const vf lb = a - norms * radius;
    low = lb > low ? lb : low;
    for (int j = 0; j < kLanes; ++j) A[(m + j / P) * vocab + v0 + j % P] = a[j];
  }
}

// Table rows [v0, v1) against every h row: approximate logits into A, the task's largest
// lower bound per h row into `lower`.
void ApproxRows(const float* H, const int8_t* Q, const float* S, const float* R,
                const float* nx, int64_t rows, int64_t d, int64_t vocab, int64_t v0, int64_t v1,
                float* A, float* lower) {
  // h rows in groups of 8, then 4, 2, 1 (at most 7 groups for 32 rows), one `low` each
  int64_t starts[8], sizes[8];
  int groups = 0;
  for (int64_t m = 0; m < rows;) {
    const int64_t g = rows - m >= 8 ? 8 : rows - m >= 4 ? 4 : rows - m >= 2 ? 2 : 1;
    starts[groups] = m;
    sizes[groups++] = g;
    m += g;
  }
  vf low[8];
  for (int i = 0; i < groups; ++i) low[i] = Splat(-std::numeric_limits<float>::infinity());
  int64_t v = v0;
  for (; v + kLanes <= v1; v += kLanes) {
    for (int i = 0; i < groups; ++i) {
      const int64_t m = starts[i];
      switch (sizes[i]) {
        case 8: QuantBlock<8>(H, Q, S, R, nx, d, vocab, m, v, A, low[i]); break;
        case 4: QuantBlock<4>(H, Q, S, R, nx, d, vocab, m, v, A, low[i]); break;
        case 2: QuantBlock<2>(H, Q, S, R, nx, d, vocab, m, v, A, low[i]); break;
        default: QuantBlock<1>(H, Q, S, R, nx, d, vocab, m, v, A, low[i]);
      }
    }
  }
  for (int i = 0; i < groups; ++i) {
    const int64_t per = kLanes / sizes[i];  // lanes per h row
    for (int j = 0; j < kLanes; ++j) {
      const int64_t r = starts[i] + j / per;
      lower[r] = std::max(lower[r], low[i][j]);
    }
  }
  for (; v < v1; ++v) {  // the table's last < kLanes rows
    for (int64_t m = 0; m < rows; ++m) {
      float s = 0.0f;
      for (int64_t k = 0; k < d; ++k) s += H[m * d + k] * Q[v * d + k];
      const float a = S[v] * s;
      A[m * vocab + v] = a;
      lower[m] = std::max(lower[m], a - nx[m] * R[v]);
    }
  }
}

// ------------------------------------------------------------------ exact rescoring

// The logits kernel's fp32 logit of table row v for one h row: its tile for the rows of a
// full block (Tile<1> over the block; any tile sums a row the same way), RowDots for the
// table's last < kLanes rows, as TiledRows runs them. `block` caches the last block.
struct Exact {
  const float* h;
  const float* E;
  int64_t d, tail;  // tail: the first row past the last full block
  int64_t cached = -1;
  float block[kLanes];

  float operator()(int64_t v) {
    if (v >= tail) {
      float out;
      RowDots<1, 1>(h, E + v * d, d, 0, &out, 0);
      return out;
    }
    const int64_t b0 = v / kLanes * kLanes;
    if (b0 != cached) {
      Tile<1>(h, E + b0 * d, d, block, 0);
      cached = b0;
    }
    return block[v - b0];
  }
};

// ||x_m|| for the h rows [rows, d], rounded up (computed in double, then one float rounding)
inline float* HiddenNorms(const float* H, int64_t rows, int64_t d) {
  float* nx = Scratch(0, rows);
  for (int64_t m = 0; m < rows; ++m) {
    double s = 0.0;
    for (int64_t k = 0; k < d; ++k) s += static_cast<double>(H[m * d + k]) * H[m * d + k];
    nx[m] = static_cast<float>(std::sqrt(s) * (1.0 + 1e-6));
  }
  return nx;
}
#endif

}  // namespace
