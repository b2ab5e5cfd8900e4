// Gumbel noise as jax.random.gumbel(key, (n,)) draws it (mode "low", fp32), a vector of
// lanes at a time, for sampling inside a kernel (pick_cpu.cc): the same random bits as
// jax's partitionable Threefry-2x32, the same bits-to-uniform map, and -log(-log(u)) with
// a Cephes-style logarithm (within a few fp32 ulps of XLA's; tests/test_cpu_pick.py).

#pragma once

#include "cpu_common.h"

namespace {

inline vu32 Rotl(vu32 x, int r) { return (x << r) | (x >> (32 - r)); }

// jax.random.bits(key, (n,))[c] for the lanes' counters c < 2^32 of N registers:
// Threefry-2x32 (20 rounds) of the 64-bit counter (0, c) under key (k0, k1), its two words
// xor'ed. N registers at once: each round is a chain of dependent add, rotate and xor.
template <int N>
inline void ThreefryBits(uint32_t k0, uint32_t k1, const vu32* c, vu32* bits) {
  static constexpr int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  vu32 x0[N], x1[N];
  for (int n = 0; n < N; ++n) {
    x0[n] = vu32{} + k0;
    x1[n] = c[n] + k1;
  }
#pragma GCC unroll 5
  for (int i = 0; i < 5; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
#pragma GCC unroll 4
      for (int n = 0; n < N; ++n) {
        x0[n] += x1[n];
        x1[n] = Rotl(x1[n], kRot[i % 2][j]);
        x1[n] ^= x0[n];
      }
    }
    for (int n = 0; n < N; ++n) {
      x0[n] += ks[(i + 1) % 3];
      x1[n] += ks[(i + 2) % 3] + static_cast<uint32_t>(i + 1);
    }
  }
  for (int n = 0; n < N; ++n) bits[n] = x0[n] ^ x1[n];
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

// jax.random.gumbel(key, (n,), float32)[c0 + j] for j in [0, N kLanes) into noise: u = the
// top 23 bits as a float in [0, 1), times (1 - tiny) (1 in fp32) plus tiny, at least tiny
// (jax's uniform on [tiny, 1)); then -log(-log(u)).
template <int N>
inline void GumbelBlock(uint32_t k0, uint32_t k1, int64_t c0, float* noise) {
  constexpr float kTiny = std::numeric_limits<float>::min();
  vu32 c[N], bits[N];
  for (int n = 0; n < N; ++n) {
    for (int l = 0; l < kLanes; ++l) c[n][l] = static_cast<uint32_t>(c0 + n * kLanes + l);
  }
  ThreefryBits<N>(k0, k1, c, bits);
  for (int n = 0; n < N; ++n) {
    const vf f = (vf)((bits[n] >> 9) | 0x3F800000u) - 1.0f;
    vf u = f * (1.0f - kTiny) + kTiny;
    u = u < kTiny ? Splat(kTiny) : u;
    Store(noise + n * kLanes, -LogPositive(-LogPositive(u)));
  }
}

// noise[j] = jax.random.gumbel(key, (n,))[c0 + j] for j in [0, count).
inline void GumbelRange(uint32_t k0, uint32_t k1, int64_t c0, int64_t count, float* noise) {
  int64_t j = 0;
  for (; j + 4 * kLanes <= count; j += 4 * kLanes) GumbelBlock<4>(k0, k1, c0 + j, noise + j);
  for (; j + kLanes <= count; j += kLanes) GumbelBlock<1>(k0, k1, c0 + j, noise + j);
  if (j < count) {
    float tail[kLanes];
    GumbelBlock<1>(k0, k1, c0 + j, tail);
    std::memcpy(noise + j, tail, (count - j) * sizeof(float));
  }
}

}  // namespace
