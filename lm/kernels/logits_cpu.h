// The fp32 tiles of the few-row logits product (logits_cpu.cc), shared with the exact
// rescoring of the greedy kernel (pick_cpu.cc), which must reproduce its logits bit for
// bit: every table row's logit is summed in the same order whatever tile it falls in
// (tests/test_cpu_logits.py, test_a_row_does_not_depend_on_its_batch).

#pragma once

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
      for (int p = 0; p < P; ++p) acc[i][p] = Fma(hv, ev[p], acc[i][p]);
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

#if defined(__AVX512F__)
// The 16 lane sums of a[0..15] as one vector: lane j = sum(a[j]). Four levels of shuffles
// and adds (30 shuffles, 15 adds) instead of 16 separate horizontal sums (~10 ops each),
// which made the batch-8 product compute-bound at twice the table's read time.
__attribute__((always_inline)) inline vf SumsOfLanes(const vf* a) {
  // level 4 leaves lane 4q + t holding input 4t + q: feed the inputs transposed
  __m512 x[16];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) x[4 * t + q] = (__m512)a[4 * q + t];
  __m512 b[8], c[4];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j)  // 256-bit halves: quarters 0-1 input 2j, 2-3 input 2j+1
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0xEE));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)  // 128-bit quarters: quarter q holds input 4j + q
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
  __m512 d[2];
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j) {  // float pairs: quarter q holds inputs 8j + q, 8j + 4 + q
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(c[2 * j]),
                                          _mm512_castps_pd(c[2 * j + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(c[2 * j]),
                                          _mm512_castps_pd(c[2 * j + 1]));
    d[j] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  return (vf)_mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88),
                           _mm512_shuffle_ps(d[0], d[1], 0xDD));
}

#elif defined(__AVX2__)
// The 8 lane sums of a[0..7] as one vector: lane j = sum(a[j]), every one added in the
// same order ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)): two levels of horizontal adds,
// then the two 128-bit halves.
__attribute__((always_inline)) inline vf SumsOfLanes(const vf* a) {
  __m256 t[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) t[j] = _mm256_hadd_ps((__m256)a[2 * j], (__m256)a[2 * j + 1]);
  const __m256 u0 = _mm256_hadd_ps(t[0], t[1]), u1 = _mm256_hadd_ps(t[2], t[3]);
  return (vf)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                           _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// One register of table values as floats: fp32 as is, int8 widened (vpmovsxbd +
// vcvtdq2ps; GCC's generic conversion of a byte vector goes through scalar registers).
inline vf LoadRow(const float* p) { return Load(p); }
inline vf LoadRow(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return (vf)_mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}

// G h rows x P = kLanes / G table rows (fp32, or int8 for the greedy kernel's estimate)
// in kLanes accumulators over the whole width (d a multiple of kLanes), then one
// SumsOfLanes: out[i, v + p] for the tile, P at a time. With one h row each table
// register goes straight into its sum (no 17th AVX2 register, no spill); every
// accumulator sees the same multiply-adds in the same order whatever G is.
template <int G, typename T>
__attribute__((always_inline)) inline void Tile(const float* h, const T* e, int64_t d,
                                                float* out, int64_t out_stride) {
  constexpr int P = kLanes / G;
  vf acc[G * P];
#pragma GCC unroll 16
  for (int j = 0; j < G * P; ++j) acc[j] = Splat(0.0f);
  for (int64_t k = 0; k < d; k += kLanes) {
    if constexpr (G == 1) {
      const vf hv = Load(h + k);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) acc[p] = Fma(hv, LoadRow(e + p * d + k), acc[p]);
    } else {
      vf ev[P];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) ev[p] = LoadRow(e + p * d + k);
#pragma GCC unroll 16
      for (int i = 0; i < G; ++i) {
        const vf hv = Load(h + i * d + k);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) acc[i * P + p] = Fma(hv, ev[p], acc[i * P + p]);
      }
    }
  }
  const vf sums = SumsOfLanes(acc);
#pragma GCC unroll 16
  for (int i = 0; i < G; ++i)
    std::memcpy(out + i * out_stride, reinterpret_cast<const float*>(&sums) + i * P, 4 * P);
}
#endif

// Rows<G> for G = 1..kGroup h rows
using RowsFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, float*, int64_t);
constexpr RowsFn kRowsFor[kGroup + 1] = {nullptr,  Rows<1>, Rows<2>, Rows<3>, Rows<4>,
                                         Rows<5>,  Rows<6>, Rows<7>, Rows<8>};

// Table rows [v0, v1) against all `rows` h rows, up to kGroup h rows in registers at a time.
inline void GroupedRows(const float* H, const float* E, int64_t rows, int64_t d, int64_t v0,
                        int64_t v1, float* O, int64_t vocab) {
  for (int64_t m0 = 0; m0 < rows; m0 += kGroup) {
    const int64_t g = std::min<int64_t>(kGroup, rows - m0);
    kRowsFor[g](H + m0 * d, E, d, v0, v1, O + m0 * vocab, vocab);
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
constexpr int64_t kBlock = kLanes;  // table rows per block: one Tile<1>, 2 Tile<2>, ...

template <int G>
inline void TileBlock(const float* h, const float* e, int64_t d, float* out, int64_t stride) {
  constexpr int P = kLanes / G;
  for (int t = 0; t < kBlock / P; ++t) Tile<G>(h, e + t * P * d, d, out + t * P, stride);
}

// Table rows [v0, v1) against all `rows` h rows (d a multiple of kLanes): each block of
// kLanes table rows (16 KB at d = 256 with AVX-512) is read from memory once, by the first
// group of h rows (4, then 2, then 1 at a time), and from L1 by the others; the last
// < kLanes rows as before.
inline void TiledRows(const float* H, const float* E, int64_t rows, int64_t d, int64_t v0,
                      int64_t v1, float* O, int64_t vocab) {
  int64_t v = v0;
  for (; v + kBlock <= v1; v += kBlock) {
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4) TileBlock<4>(H + m * d, E + v * d, d, O + m * vocab + v, vocab);
    if (m + 2 <= rows) {
      TileBlock<2>(H + m * d, E + v * d, d, O + m * vocab + v, vocab);
      m += 2;
    }
    if (m < rows) TileBlock<1>(H + m * d, E + v * d, d, O + m * vocab + v, vocab);
  }
  if (v < v1) GroupedRows(H, E, rows, d, v, v1, O, vocab);
}
#endif

}  // namespace
