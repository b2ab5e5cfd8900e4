// Gumbel noise as jax.random.gumbel(key, (n,)) draws it (mode "low", fp32), a vector of
// lanes at a time, for sampling inside a kernel (pick_cpu.cc): the same random bits as
// jax's partitionable Threefry-2x32, the same bits-to-uniform map, and -log(-log(u)) with
// a Cephes-style logarithm (within a few fp32 ulps of XLA's; tests/test_cpu_pick.py).

#pragma once

#include "cpu_common.h"

namespace {

inline vu32 Rotl(vu32 x, int r) { return (x << r) | (x >> (32 - r)); }

// jax.random.bits(key, (n,))[c] for the lanes' counters c < 2^32: Threefry-2x32 (20
// rounds) of the 64-bit counter (0, c) under key (k0, k1), its two words xor'ed.
inline vu32 ThreefryBits(uint32_t k0, uint32_t k1, vu32 c) {
  static constexpr int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  vu32 x0 = vu32{} + k0, x1 = c + k1;
#pragma GCC unroll 5
  for (int i = 0; i < 5; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      x0 += x1;
      x1 = Rotl(x1, kRot[i % 2][j]);
      x1 ^= x0;
    }
    x0 += ks[(i + 1) % 3];
    x1 += ks[(i + 2) % 3] + static_cast<uint32_t>(i + 1);
  }
  return x0 ^ x1;
}

// Natural log of positive, normal, finite lanes (Cephes' logf: x = m 2^e, m in
// [sqrt(1/2), sqrt(2)), a degree-9 polynomial in m - 1; about 1 ulp).
inline vf LogPositive(vf x) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xFF) - 126;  // x = m 2^e, m in [0.5, 1)
  vf m = (vf)((bits & 0x007FFFFF) | 0x3F000000);
  const vi small = m < 0.70710678118654752f;  // -1 where true
  e += small;
  m = (small ? m + m : m) - 1.0f;
  const vf ef = __builtin_convertvector(e, vf);
  const vf z = m * m;
  vf y = 7.0376836292e-2f * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * ef;
}

// jax.random.gumbel(key, (n,), float32)[c] for the lanes' counters c: u = the top 23 bits
// as a float in [0, 1), times (1 - tiny) (1 in fp32) plus tiny, at least tiny (jax's
// uniform on [tiny, 1)); then -log(-log(u)).
inline vf GumbelNoise(uint32_t k0, uint32_t k1, vu32 c) {
  constexpr float kTiny = std::numeric_limits<float>::min();
  const vu32 bits = ThreefryBits(k0, k1, c);
  const vf f = (vf)((bits >> 9) | 0x3F800000u) - 1.0f;
  vf u = f * (1.0f - kTiny) + kTiny;
  u = u < kTiny ? Splat(kTiny) : u;
  return -LogPositive(-LogPositive(u));
}

// noise[j] = jax.random.gumbel(key, (n,))[c0 + j] for j in [0, count).
inline void GumbelRange(uint32_t k0, uint32_t k1, int64_t c0, int64_t count, float* noise) {
  vu32 lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = static_cast<uint32_t>(l);
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes)
    Store(noise + j, GumbelNoise(k0, k1, lane + static_cast<uint32_t>(c0 + j)));
  if (j < count) {
    float tail[kLanes];
    Store(tail, GumbelNoise(k0, k1, lane + static_cast<uint32_t>(c0 + j)));
    std::memcpy(noise + j, tail, (count - j) * sizeof(float));
  }
}

}  // namespace
