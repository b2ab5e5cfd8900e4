// The pick kernels' shared pieces (pick_cpu.cc, top_k_cpu.cc): approximate logits from the
// int8 copy of the table with each row's largest lower bound, exact fp32 logits with the
// logits kernel's tiles, and the hidden rows' norms (lm/kernels/pick.py).

#pragma once

#include <cmath>

#include "logits_cpu.h"

namespace {

// ------------------------------------------------------------ int16 copy of the h rows
// With AVX2 (not AVX-512) the approximate pass multiplies the int8 table by an int16 copy
// of each h row, x ~ sh * hq with |hq| <= HiddenLevels(d): 16 exact integer products per
// vpmaddwd where the fp32 pass did 8 per FMA after widening every table value to fp32
// (vpmovsxbd + vcvtdq2ps). The quantize kernel's radius reserves HiddenShare(d) * scale *
// ||q|| per unit of ||x|| for ||x - sh hq||, which QuantizeHidden checks for every row.

// hq's largest magnitude: any sum of d products hq * q (|q| <= 127) fits an int32
inline int32_t HiddenLevels(int64_t d) {
  return static_cast<int32_t>(
      std::min<int64_t>(32767, 2147483647LL / (127 * std::max<int64_t>(d, 1))));
}

// ||x - sh hq|| <= HiddenShare(d) ||x||: each element is off by at most sh / 2 (plus the
// fp32 rounding of x / sh, < 0.01 sh), and sh = max|x| / levels <= ||x|| / levels
inline double HiddenShare(int64_t d) {
  return 0.52 * std::sqrt(static_cast<double>(d)) / HiddenLevels(d);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr bool kIntPass = true;
#else
constexpr bool kIntPass = false;
#endif

struct HiddenInt {
  const int16_t* q = nullptr;  // [rows, d]; null: the fp32 pass
  const float* scale = nullptr;  // sh per row
};

// The int16 copy of the h rows (on the calling thread: Scratch is per thread). A row whose
// rounding error exceeds the radius's share (a subnormal scale) gets ||x|| = inf, which
// sends it to the exact path like a non-finite row.
inline HiddenInt QuantizeHidden(const float* H, int64_t rows, int64_t d, float* nx) {
  if (!kIntPass || d % 16 != 0) return {};
  int16_t* hq = reinterpret_cast<int16_t*>(Scratch(6, rows * d / 2 + 1));
  float* sh = Scratch(7, rows);
  const int32_t levels = HiddenLevels(d);
  const double share = HiddenShare(d);
  for (int64_t m = 0; m < rows; ++m) {
    const float* x = H + m * d;
    int16_t* out = hq + m * d;
    float mx = 0.0f;
    for (int64_t k = 0; k < d; ++k) mx = std::max(mx, std::fabs(x[k]));
    const float s = mx / static_cast<float>(levels);
    sh[m] = s;
    if (!std::isfinite(nx[m]) || !(s > 0.0f)) {  // NaN / inf (exact path), or x = 0
      std::memset(out, 0, 2 * d);
      continue;
    }
    const float inv = static_cast<float>(levels) / mx;
    double r2 = 0.0;
    for (int64_t k = 0; k < d; ++k) {
      float t = std::nearbyint(x[k] * inv);
      t = std::min(std::max(t, -static_cast<float>(levels)), static_cast<float>(levels));
      out[k] = static_cast<int16_t>(t);
      const double r = static_cast<double>(x[k]) - static_cast<double>(s) * t;
      r2 += r * r;
    }
    if (!(std::sqrt(r2) <= share * nx[m])) nx[m] = std::numeric_limits<float>::infinity();
  }
  return {hq, sh};
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// The 8 lane sums of a[0..7] as one vector of int32 (exact: integer adds)
__attribute__((always_inline)) inline __m256i SumsOfLanesInt(const __m256i* a) {
  __m256i t[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) t[j] = _mm256_hadd_epi32(a[2 * j], a[2 * j + 1]);
  const __m256i u0 = _mm256_hadd_epi32(t[0], t[1]), u1 = _mm256_hadd_epi32(t[2], t[3]);
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                          _mm256_permute2x128_si256(u0, u1, 0x31));
}

// Tile<G>'s integer twin: G int16 h rows x P = 8 / G int8 table rows, 16 products per
// vpmaddwd (pairs summed into int32 lanes), lane i * P + p of the result = h row i . table
// row p, exact (d a multiple of 16).
template <int G>
__attribute__((always_inline)) inline __m256i TileInt(const int16_t* h, const int8_t* e,
                                                       int64_t d) {
  constexpr int P = 8 / G;
  __m256i acc[G * P];
#pragma GCC unroll 8
  for (int j = 0; j < G * P; ++j) acc[j] = _mm256_setzero_si256();
  auto widen = [](const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  for (int64_t k = 0; k < d; k += 16) {
    if constexpr (G == 1) {
      const __m256i hv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + k));
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p)
        acc[p] = _mm256_add_epi32(acc[p], _mm256_madd_epi16(hv, widen(e + p * d + k)));
    } else {
      __m256i ev[P];
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) ev[p] = widen(e + p * d + k);
#pragma GCC unroll 8
      for (int i = 0; i < G; ++i) {
        const __m256i hv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i * d + k));
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p)
          acc[i * P + p] = _mm256_add_epi32(acc[i * P + p], _mm256_madd_epi16(hv, ev[p]));
      }
    }
  }
  return SumsOfLanesInt(acc);
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)  // the logits kernel's tiles
// ---------------------------------------------------------------- approximate logits

// approx[i, v] = scale[v] * (x_i . q_v) for the kLanes table rows from v, h rows [m, m + G)
// at G per tile (lane i * P + p: h row m + i, table row p); `low` keeps, lane-wise, the
// largest approx - ||x|| radius seen (a NaN approximate logit leaves it as it was; the
// caller's finiteness checks catch it).
// With the int16 h rows (hi.q not null): approx = fl(fl(x_i . q_v as an exact integer) *
// fl(scale[v] * sh_i)).
template <int G>
inline void QuantBlock(const float* H, const HiddenInt& hi, const int8_t* Q, const float* S,
                       const float* R, const float* nx, int64_t d, int64_t vocab, int64_t m,
                       int64_t v, float* A, vf& low) {
  constexpr int P = kLanes / G;
  vf norms, hs = Splat(1.0f);
  for (int j = 0; j < kLanes; ++j) norms[j] = nx[m + j / P];
  if (hi.q != nullptr) {
    for (int j = 0; j < kLanes; ++j) hs[j] = hi.scale[m + j / P];
  }
  for (int t = 0; t < kLanes / P; ++t) {
    const int64_t v0 = v + t * P;
    vf sums;
#if defined(__AVX2__) && !defined(__AVX512F__)
    if (hi.q != nullptr) {
      sums = (vf)_mm256_cvtepi32_ps(TileInt<G>(hi.q + m * d, Q + v0 * d, d));
    } else {
      Tile<G>(H + m * d, Q + v0 * d, d, reinterpret_cast<float*>(&sums), P);
    }
#else
    Tile<G>(H + m * d, Q + v0 * d, d, reinterpret_cast<float*>(&sums), P);  // [i * P + p]
#endif
    vf scale, radius;
    for (int j = 0; j < kLanes; ++j) {
      scale[j] = S[v0 + j % P];
      radius[j] = R[v0 + j % P];
    }
    const vf a = sums * (scale * hs);
    const vf lb = a - norms * radius;
    low = lb > low ? lb : low;
    for (int j = 0; j < kLanes; ++j) A[(m + j / P) * vocab + v0 + j % P] = a[j];
  }
}

// Table rows [v0, v1) against every h row: approximate logits into A, the task's largest
// lower bound per h row into `lower`.
void ApproxRows(const float* H, const HiddenInt& hi, const int8_t* Q, const float* S,
                const float* R, const float* nx, int64_t rows, int64_t d, int64_t vocab, int64_t v0, int64_t v1,
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
        case 8: QuantBlock<8>(H, hi, Q, S, R, nx, d, vocab, m, v, A, low[i]); break;
        case 4: QuantBlock<4>(H, hi, Q, S, R, nx, d, vocab, m, v, A, low[i]); break;
        case 2: QuantBlock<2>(H, hi, Q, S, R, nx, d, vocab, m, v, A, low[i]); break;
        default: QuantBlock<1>(H, hi, Q, S, R, nx, d, vocab, m, v, A, low[i]);
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
      float a;
      if (hi.q != nullptr) {
        int64_t s = 0;
        for (int64_t k = 0; k < d; ++k) s += hi.q[m * d + k] * Q[v * d + k];
        a = static_cast<float>(s) * (S[v] * hi.scale[m]);
      } else {
        float s = 0.0f;
        for (int64_t k = 0; k < d; ++k) s += H[m * d + k] * Q[v * d + k];
        a = S[v] * s;
      }
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
