// Softmax cross-entropy over rows of fp32 logits as XLA FFI custom calls
// (lm/kernels/cross_entropy.py builds and registers them), for the fused output
// projection + loss of lm/objectives/losses.py.
//
// Per row r of logits [N, V] with target t and weight w:
//   loss[r]    = (max + log(sum_v exp(x_v - max)) - x_t) * w
//   correct[r] = (x_t >= max) * w            (ties count as correct)
//   dlogits[r] = (softmax(x) - onehot(t)) * w  (fp32 or bf16; the gradient variants)
// XLA runs this as four or five passes over the [chunk, V] array (max, exp, sum, the
// gradient and its conversion), each reading or writing the whole array from memory
// (a GPT-2 chunk: 103 MB). Here one row (V = 50257: 200 KB) stays in the core's L2
// cache across the passes: the logits are read from memory once and the gradient
// written once. Rows of weight 0 (padding) are skipped: zero loss and gradient.

#include <cmath>
#include <limits>

#include "cpu_common.h"

namespace {

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

struct Row {
  float loss, correct;
};

// Pass 1: the row's max (a NaN or an infinite logit makes the exponentials' sum, and
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

// Pass 2: e = exp(x - max) into `e` (may be null: the sum alone), returns sum(e).
inline float ExpSum(const float* x, int64_t v, float mx, float* e) {
  const vf vm = Splat(mx);
  vf s0 = Splat(0.0f), s1 = Splat(0.0f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= v; j += 2 * kLanes) {
    const vf a = ExpNonPositive(Load(x + j) - vm);
    const vf b = ExpNonPositive(Load(x + j + kLanes) - vm);
    if (e) {
      Store(e + j, a);
      Store(e + j + kLanes, b);
    }
    s0 += a;
    s1 += b;
  }
  for (; j + kLanes <= v; j += kLanes) {
    const vf a = ExpNonPositive(Load(x + j) - vm);
    if (e) Store(e + j, a);
    s0 += a;
  }
  float sum = HorizontalSum(s0 + s1);
  for (; j < v; ++j) {
    const float a = std::exp(x[j] - mx);
    if (e) e[j] = a;
    sum += a;
  }
  return sum;
}

inline Row Stats(float xt, float w, float mx, float sum) {
  return {(mx + std::log(sum) - xt) * w, (xt >= mx ? 1.0f : 0.0f) * w};
}

inline int32_t Clamp(int32_t t, int64_t v) {  // as XLA's gather clamps an index
  return t < 0 ? 0 : (t >= v ? static_cast<int32_t>(v - 1) : t);
}

// Pass 3: out = e * (w / sum), then out[t] -= w; fp32 in place (e is out) or to bf16.
inline void GradF32(float* e, int64_t v, float scale, int32_t t, float w) {
  const vf vs = Splat(scale);
  int64_t j = 0;
  for (; j + kLanes <= v; j += kLanes) Store(e + j, Load(e + j) * vs);
  for (; j < v; ++j) e[j] *= scale;
  e[t] -= w;
}

inline void GradBf16(const float* e, int64_t v, float scale, int32_t t, float w, uint16_t* out) {
  const vf vs = Splat(scale);
  int64_t j = 0;
  for (; j + kLanes <= v; j += kLanes) StoreBf16(out + j, Load(e + j) * vs);
  for (; j < v; ++j) out[j] = ToBf16(e[j] * scale);
  out[t] = ToBf16(e[t] * scale - w);
}

constexpr int64_t kRowsPerTask = 4;

struct Shape {
  int64_t n, v;
};

// Rows of logits with a trailing vocabulary axis; targets and weights one per row.
ffi::Error CheckShape(const ffi::Buffer<ffi::F32>& logits, const ffi::Buffer<ffi::S32>& targets,
                      const ffi::Buffer<ffi::F32>& weights, Shape* s) {
  const auto dims = logits.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("logits need a vocabulary axis");
  s->v = dims.back();
  s->n = s->v ? static_cast<int64_t>(logits.element_count()) / s->v : 0;
  if (static_cast<int64_t>(targets.element_count()) != s->n ||
      static_cast<int64_t>(weights.element_count()) != s->n || s->v < 1) {
    return ffi::Error::InvalidArgument("targets and weights need one value per logits row");
  }
  return ffi::Error::Success();
}

ffi::Error StatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                     ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                     ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> correct) {
  Shape s;
  if (auto e = CheckShape(logits, targets, weights, &s); e.failure()) return e;
  const float* X = logits.typed_data();
  const int32_t* T = targets.typed_data();
  const float* W = weights.typed_data();
  float* L = loss->typed_data();
  float* C = correct->typed_data();
  ParallelFor(pool, (s.n + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    for (int64_t r = task * kRowsPerTask; r < std::min(s.n, (task + 1) * kRowsPerTask); ++r) {
      if (W[r] == 0.0f) {
        L[r] = C[r] = 0.0f;
        continue;
      }
      const float* x = X + r * s.v;
      const float mx = RowMax(x, s.v);
      const Row row = Stats(x[Clamp(T[r], s.v)], W[r], mx, ExpSum(x, s.v, mx, nullptr));
      L[r] = row.loss;
      C[r] = row.correct;
    }
  });
  return ffi::Error::Success();
}

template <ffi::DataType G>
ffi::Error GradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                    ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                    ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> correct,
                    ffi::ResultBuffer<G> dlogits) {
  Shape s;
  if (auto e = CheckShape(logits, targets, weights, &s); e.failure()) return e;
  const float* X = logits.typed_data();
  const int32_t* T = targets.typed_data();
  const float* W = weights.typed_data();
  float* L = loss->typed_data();
  float* C = correct->typed_data();
  void* D = dlogits->untyped_data();
  ParallelFor(pool, (s.n + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    for (int64_t r = task * kRowsPerTask; r < std::min(s.n, (task + 1) * kRowsPerTask); ++r) {
      float* out32 = static_cast<float*>(D) + r * s.v;
      uint16_t* out16 = static_cast<uint16_t*>(D) + r * s.v;
      if (W[r] == 0.0f) {
        L[r] = C[r] = 0.0f;
        if constexpr (G == ffi::DataType::F32) {
          std::fill(out32, out32 + s.v, 0.0f);
        } else {
          std::fill(out16, out16 + s.v, static_cast<uint16_t>(0));
        }
        continue;
      }
      const float* x = X + r * s.v;
      const int32_t t = Clamp(T[r], s.v);
      const float mx = RowMax(x, s.v), xt = x[t];
      // fp32: the exponentials go straight into the gradient, which may be the logits'
      // own buffer (the call aliases them: each element is read before it is written)
      float* e = G == ffi::DataType::F32 ? out32 : Scratch(0, s.v);
      const float sum = ExpSum(x, s.v, mx, e);
      const Row row = Stats(xt, W[r], mx, sum);
      L[r] = row.loss;
      C[r] = row.correct;
      if constexpr (G == ffi::DataType::F32) {
        GradF32(e, s.v, W[r] / sum, t, W[r]);
      } else {
        GradBf16(e, s.v, W[r] / sum, t, W[r], out16);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmCrossEntropyStats, StatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmCrossEntropyGradF32, GradImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmCrossEntropyGradBF16, GradImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
