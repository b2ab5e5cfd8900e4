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
#include <type_traits>

#include "cpu_common.h"

namespace {

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

// One call's rows: logits [n, v] with a trailing vocabulary axis, a target and a weight
// per row in, the weighted loss and correct flag per row out.
struct Rows {
  int64_t n, v;
  const float* x;
  const int32_t* t;
  const float* w;
  float* loss;
  float* correct;
};

ffi::Error GetRows(const ffi::Buffer<ffi::F32>& logits, const ffi::Buffer<ffi::S32>& targets,
                   const ffi::Buffer<ffi::F32>& weights, ffi::ResultBuffer<ffi::F32>& loss,
                   ffi::ResultBuffer<ffi::F32>& correct, Rows* rows) {
  const auto dims = logits.dimensions();
  if (dims.size() < 1 || dims.back() < 1) {
    return ffi::Error::InvalidArgument("logits need a non-empty vocabulary axis");
  }
  const int64_t v = dims.back(), n = static_cast<int64_t>(logits.element_count()) / v;
  if (static_cast<int64_t>(targets.element_count()) != n ||
      static_cast<int64_t>(weights.element_count()) != n) {
    return ffi::Error::InvalidArgument("targets and weights need one value per logits row");
  }
  *rows = {n, v, logits.typed_data(), targets.typed_data(), weights.typed_data(),
           loss->typed_data(), correct->typed_data()};
  return ffi::Error::Success();
}

// body(r) for every row of weight != 0 (on XLA's pool, kRowsPerTask rows a task); rows of
// weight 0 (padding) get a zero loss and correct flag, and zero(r) for their gradient.
template <typename Body, typename Zero>
void ForEachRow(ffi::ThreadPool& pool, const Rows& c, Body body, Zero zero) {
  ParallelFor(pool, (c.n + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    for (int64_t r = task * kRowsPerTask; r < std::min(c.n, (task + 1) * kRowsPerTask); ++r) {
      if (c.w[r] == 0.0f) {
        c.loss[r] = c.correct[r] = 0.0f;
        zero(r);
      } else {
        body(r);
      }
    }
  });
}

// Passes 1 and 2 of row r (exponentials into `e` unless null) and its loss and correct
// flag; returns the exponentials' sum.
inline float RowStats(const Rows& c, int64_t r, float* e) {
  const float* x = c.x + r * c.v;
  const float mx = RowMax(x, c.v), xt = x[Clamp(c.t[r], c.v)];  // xt before e overwrites x
  const float sum = ExpSum(x, c.v, mx, e), w = c.w[r];
  c.loss[r] = (mx + std::log(sum) - xt) * w;
  c.correct[r] = (xt >= mx ? 1.0f : 0.0f) * w;  // ties count as correct
  return sum;
}

ffi::Error StatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                     ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                     ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> correct) {
  Rows c;
  if (auto e = GetRows(logits, targets, weights, loss, correct, &c); e.failure()) return e;
  ForEachRow(pool, c, [&](int64_t r) { RowStats(c, r, nullptr); }, [](int64_t) {});
  return ffi::Error::Success();
}

template <ffi::DataType G>
ffi::Error GradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                    ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                    ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> correct,
                    ffi::ResultBuffer<G> dlogits) {
  using T = std::conditional_t<G == ffi::DataType::F32, float, uint16_t>;  // bf16 bits
  Rows c;
  if (auto e = GetRows(logits, targets, weights, loss, correct, &c); e.failure()) return e;
  T* D = static_cast<T*>(dlogits->untyped_data());
  ForEachRow(
      pool, c,
      [&](int64_t r) {
        T* out = D + r * c.v;
        const int32_t t = Clamp(c.t[r], c.v);
        if constexpr (G == ffi::DataType::F32) {
          // the exponentials go straight into the gradient, which may be the logits' own
          // buffer (the call aliases them: each element is read before it is written)
          const float sum = RowStats(c, r, out);
          GradF32(out, c.v, c.w[r] / sum, t, c.w[r]);
        } else {
          float* e = Scratch(0, c.v);
          const float sum = RowStats(c, r, e);
          GradBf16(e, c.v, c.w[r] / sum, t, c.w[r], out);
        }
      },
      [&](int64_t r) { std::fill(D + r * c.v, D + (r + 1) * c.v, T{0}); });
  return ffi::Error::Success();
}

// The handlers' common signature: logits, targets and weights in, loss and correct out.
auto RowsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmCrossEntropyStats, StatsImpl, RowsBinding());

// ... and the gradient in fp32 or bf16
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmCrossEntropyGradF32, GradImpl<ffi::DataType::F32>,
                              RowsBinding().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmCrossEntropyGradBF16, GradImpl<ffi::DataType::BF16>,
                              RowsBinding().Ret<ffi::Buffer<ffi::BF16>>());
