// Shared pieces of lm's CPU kernels (lm/kernels/*_cpu.cc): one register of floats as a
// GCC/Clang vector, a vectorised exp, horizontal reductions, bf16 rounding, a row's max and
// sum of exponentials, transposes through 8 x 8 register blocks, scratch buffers and a
// parallel loop over XLA's intra-op thread pool.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


namespace {


// One register of floats (GCC/Clang vector extensions): 16 lanes with AVX-512, 8 with
// AVX2 (Python uses the kernel only on x86 CPUs with one of the two).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf Splat(float x) { return vf{} + x; }
// a * b + c rounded once, in every instantiation (GCC contracts `acc += a * b` into an FMA
// in some template instances and not in others, so equal sums came out unequal).
inline vf Fma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// exp(x) for x <= 0 (softmax after the row max), lane-wise: 2^n * p(r), |r| <= ln2 / 2,
// a degree-6 Taylor polynomial (relative error < 2e-7).
inline vf ExpNonPositive(vf x) {
  x = x < -87.0f ? Splat(-87.0f) : x;
  x = x > 0.0f ? Splat(0.0f) : x;  // a row with no allowed key: its max is -3e38
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * 1.44269504088896341f + shifter;
  const vf n = t - shifter;
  const vi ni = (vi)t - 0x4B400000;  // the integer n
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  const vf p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (
      1.0f / 120 + r * (1.0f / 720))))));
  return p * (vf)((ni + 127) << 23);
}

// exp(x - mx) with exactly 0 below e^-87 (a -inf logit: probability 0, never drawn).
inline vf Weight(vf x, float mx) {
  const vf d = x - mx;
  return d < -87.0f ? Splat(0.0f) : ExpNonPositive(d);
}

typedef uint32_t vu32 __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));

// fp32 -> bf16, round to nearest even (a NaN stays a quiet NaN), as XLA converts.
inline uint16_t ToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if (x != x) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline void StoreBf16(uint16_t* p, vf x) {
  vu32 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const vu32 nan = (vu32)(x != x);
  const vu32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vh h = __builtin_convertvector(nan ? (bits >> 16) | 0x40u : rounded, vh);
  std::memcpy(p, &h, sizeof(h));
}

typedef float v4 __attribute__((vector_size(16)));

// Horizontal reductions over 4-float pieces (vector adds / maxes, then 3 scalar ops).
inline v4 Piece(vf v, int which) {
  v4 q;
  std::memcpy(&q, reinterpret_cast<const char*>(&v) + 16 * which, sizeof(q));
  return q;
}

inline float HorizontalSum(vf v) {
  v4 a = Piece(v, 0);
  for (int i = 1; i < kLanes / 4; ++i) a += Piece(v, i);
  return (a[0] + a[1]) + (a[2] + a[3]);
}

inline float HorizontalMax(vf v) {
  v4 a = Piece(v, 0);
  for (int i = 1; i < kLanes / 4; ++i) {
    const v4 b = Piece(v, i);
    a = a > b ? a : b;
  }
  const float x = a[0] > a[1] ? a[0] : a[1], y = a[2] > a[3] ? a[2] : a[3];
  return x > y ? x : y;
}

// Softmax pieces shared by the cross-entropy kernels (cross_entropy_cpu.cc,
// amx_projection_cpu.cc).
// The row's max (a NaN or an infinite logit makes the exponentials' sum, and
// so the loss, NaN, as in XLA's path).
inline float RowMax(const float* x, int64_t v) {
  vf m = Splat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= v; j += kLanes) {
    const vf a = Load(x + j);
    m = a > m ? a : m;
  }
  float mx = HorizontalMax(m);
  for (; j < v; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

// The index of the row's largest value: the first one on ties, the first NaN if the row
// has one, index 0 for a row of -inf (as jnp.argmax), in two vectorised passes (XLA:CPU
// runs jnp.argmax's variadic reduction as a scalar loop). Shared by the argmax and greedy
// kernels.
inline int32_t RowArgmax(const float* x, int64_t v) {
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

// e = exp(x - max) into `e` (may be null: the sum alone), returns sum(e). Summed in blocks
// of 32 vectors (each block's two accumulators start at zero, then join the total): a
// lane adds at most 16 terms before its block ends, so a long row's sum (50257 logits)
// loses no more than XLA's tree reduction does, whatever the vector width.
inline float ExpSum(const float* x, int64_t v, float mx, float* e) {
  constexpr int64_t kBlock = 32 * kLanes;
  const vf vm = Splat(mx);
  vf total = Splat(0.0f);
  int64_t j = 0;
  while (j + 2 * kLanes <= v) {
    vf s0 = Splat(0.0f), s1 = Splat(0.0f);
    const int64_t end = std::min(v, j + kBlock);
    for (; j + 2 * kLanes <= end; j += 2 * kLanes) {
      const vf a = ExpNonPositive(Load(x + j) - vm);
      const vf b = ExpNonPositive(Load(x + j + kLanes) - vm);
      if (e) {
        Store(e + j, a);
        Store(e + j + kLanes, b);
      }
      s0 += a;
      s1 += b;
    }
    total += s0 + s1;
  }
  for (; j + kLanes <= v; j += kLanes) {
    const vf a = ExpNonPositive(Load(x + j) - vm);
    if (e) Store(e + j, a);
    total += a;
  }
  float sum = HorizontalSum(total);
  for (; j < v; ++j) {
    const float a = std::exp(x[j] - mx);
    if (e) e[j] = a;
    sum += a;
  }
  return sum;
}

inline int32_t Clamp(int32_t t, int64_t v) {  // as XLA's gather clamps an index
  return t < 0 ? 0 : (t >= v ? static_cast<int32_t>(v - 1) : t);
}

struct Tasks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> body;

  void Run() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
      body(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs body(0..n-1) on the calling thread and the pool's workers. The caller claims
// whatever is left, so it only ever waits for tasks already running (no deadlock when
// the caller is itself a pool worker); helpers that start late find nothing to do.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> body) {
  auto tasks = std::make_shared<Tasks>();
  tasks->total = n;
  tasks->body = std::move(body);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([tasks] { tasks->Run(); });
  tasks->Run();
  while (tasks->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}


// out[c][r] = in[r][c] for r, c in [0, 8), through AVX registers (unpack, shuffle, permute).
inline void Transpose8x8(const float* in, int64_t ld_in, float* out, int64_t ld_out) {
#if defined(__AVX2__)
  __m256 r[8], t[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ld_in);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ld_out, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ld_out, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) out[j * ld_out + i] = in[i * ld_in + j];
#endif
}

// Input rows [r, r + N) (N a multiple of 8) into output columns [r, r + N): with N = 16
// each output row gets 64 contiguous bytes (a cache line) per pass.
template <int N>
inline void TransposeStrip(const float* src, int64_t ld_src, int64_t cols, float* dst,
                           int64_t ld_dst, int64_t r) {
  const int64_t cols8 = cols / 8 * 8;
  for (int64_t c = 0; c < cols8; c += 8)
    for (int i = 0; i < N; i += 8)
      Transpose8x8(src + (r + i) * ld_src + c, ld_src, dst + c * ld_dst + r + i, ld_dst);
  for (int64_t c = cols8; c < cols; ++c)
    for (int64_t i = r; i < r + N; ++i) dst[c * ld_dst + i] = src[i * ld_src + c];
}

// dst[c][r] = src[r][c] for rows [r0, r1) and all `cols` columns (row strides ld_src and
// ld_dst): strips of 16 rows, then 8, then single rows.
inline void TransposeRows(const float* src, int64_t ld_src, int64_t r0, int64_t r1,
                          int64_t cols, float* dst, int64_t ld_dst) {
  int64_t r = r0;
  for (; r + 16 <= r1; r += 16) TransposeStrip<16>(src, ld_src, cols, dst, ld_dst, r);
  for (; r + 8 <= r1; r += 8) TransposeStrip<8>(src, ld_src, cols, dst, ld_dst, r);
  for (; r < r1; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// Scratch buffers of the calling thread, reused across tasks and calls (no allocation or
// zero-filling per task).
float* Scratch(int slot, int64_t size) {
  thread_local std::vector<float> buffers[10];
  if (static_cast<int64_t>(buffers[slot].size()) < size) buffers[slot].resize(size);
  return buffers[slot].data();
}

}  // namespace
