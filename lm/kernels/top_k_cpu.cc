// Top-k sampling's k largest tempered logits straight from the hidden state, as
// lax.top_k(x @ tableᵀ * c, k) orders them, bit for bit, from the int8 copy of the table
// (pick_cpu.h) and a few exact rows (lm/kernels/pick.py).

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "pick_cpu.h"

namespace {

#if defined(__AVX512F__) || defined(__AVX2__)
// The k largest scores fl(l_v * c) of one h row with their indices, ordered as lax.top_k
// orders them (larger first, the lower index first among equal scores). Any Lk with k rows
// whose lower bound reaches it is at most the k-th largest logit, so every row of the top
// k has fl(upper * c) >= fl(Lk * c) (fp32 products round monotonically); the rows that
// pass that test are computed exactly and sorted. Lk: the k-th largest of the vocabulary
// chunks' largest lower bounds (`lower`, one per chunk, k distinct rows; a few hundred
// values), or where there are fewer than k chunks the k-th largest lower bound itself.
// False where a bound or a candidate's logit is not finite (the caller takes the logits
// path for the batch then).
bool TopKRow(Exact& exact, const float* a, const float* R, float nx, float c,
             const float* lower, int64_t chunks, int64_t stride, int64_t vocab, int64_t k,
             float* values, int32_t* indices, int64_t* rescored) {
  if (!std::isfinite(nx)) return false;
  const vf vn = Splat(nx);
  float* low = Scratch(5, std::max(vocab, chunks));
  int64_t n = chunks, v = 0;
  if (k <= chunks) {
    for (int64_t t = 0; t < chunks; ++t) low[t] = lower[t * stride];
  } else {
    n = vocab;
    for (; v + kLanes <= vocab; v += kLanes) Store(low + v, Load(a + v) - vn * Load(R + v));
    for (; v < vocab; ++v) low[v] = a[v] - nx * R[v];
  }
  std::nth_element(low, low + (k - 1), low + n, std::greater<float>());
  if (!std::isfinite(low[k - 1])) return false;
  const float threshold = low[k - 1] * c;
  thread_local std::vector<std::pair<float, int32_t>> cand;  // reused: no allocation per call
  cand.clear();
  const vf vt = Splat(threshold), vc = Splat(c);
  auto consider = [&](int64_t v) -> bool {
    const float x = exact(v);
    ++*rescored;
    if (!std::isfinite(x)) return false;
    cand.emplace_back(x * c, static_cast<int32_t>(v));
    return true;
  };
  for (v = 0; v + kLanes <= vocab; v += kLanes) {
    const vf hi = Fma(vn, Load(R + v), Load(a + v));
    const vi hit = (vi)(hi * vc >= vt) | (vi)(hi - hi != 0.0f);  // NaN, inf: not ok below
    bool any = false;
    for (int l = 0; l < kLanes; ++l) any |= hit[l] != 0;
    if (!any) continue;
    for (int l = 0; l < kLanes; ++l) {
      if (hit[l] && (!std::isfinite(a[v + l]) || !consider(v + l))) return false;
    }
  }
  for (; v < vocab; ++v) {
    const float hi = a[v] + nx * R[v];
    if (!std::isfinite(hi)) return false;
    if (hi * c >= threshold && !consider(v)) return false;
  }
  if (static_cast<int64_t>(cand.size()) < k) return false;  // cannot happen; be safe
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), [](const auto& p, const auto& q) {
    return p.first > q.first || (p.first == q.first && p.second < q.second);
  });
  for (int64_t j = 0; j < k; ++j) {
    values[j] = cand[j].first;
    indices[j] = cand[j].second;
  }
  return true;
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> table,
                    ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> radius, ffi::Buffer<ffi::F32> factor,
                    ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> indices,
                    ffi::ResultBuffer<ffi::S32> rescored_out) {
  const auto tdims = table.dimensions();
  const auto xdims = x.dimensions();
  const auto odims = values->dimensions();
  if (tdims.size() != 2 || xdims.size() != 2 || xdims[1] != tdims[1] ||
      q.element_count() != table.element_count() || scale.element_count() != tdims[0] ||
      radius.element_count() != tdims[0] || factor.element_count() != xdims[0] ||
      odims.size() != 2 || odims[0] != xdims[0]) {
    return ffi::Error::InvalidArgument(
        "need x [B, D], a table [V, D], its quantized form, factors [B], out [B, k]");
  }
  const int64_t vocab = tdims[0], d = tdims[1], rows = xdims[0], k = odims[1];
  if (d % kLanes != 0 || k < 1 || k > vocab) {
    return ffi::Error::InvalidArgument("need a width multiple of the vector width, 1 <= k <= V");
  }
  const float* H = x.typed_data();
  float* nx = HiddenNorms(H, rows, d);
  const HiddenInt hi = QuantizeHidden(H, rows, d, nx);
  const int64_t tasks = (vocab + kVocabPerTask - 1) / kVocabPerTask;
  float* A = Scratch(1, rows * vocab);
  float* lower = Scratch(2, tasks * rows);  // each chunk's largest lower bound per row
  std::fill(lower, lower + tasks * rows, -std::numeric_limits<float>::infinity());
  ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t v0 = task * kVocabPerTask, v1 = std::min(vocab, v0 + kVocabPerTask);
    ApproxRows(H, hi, q.typed_data(), scale.typed_data(), radius.typed_data(), nx, rows, d, vocab,
               v0, v1, A, lower + task * rows);
  });
  const int64_t tail = vocab / kLanes * kLanes;
  auto pick = [&](int64_t m) {
    Exact exact{H + m * d, table.typed_data(), d, tail};
    int64_t rescored = 0;
    const bool ok = TopKRow(exact, A + m * vocab, radius.typed_data(), nx[m],
                            factor.typed_data()[m], lower + m, tasks, rows, vocab, k,
                            values->typed_data() + m * k, indices->typed_data() + m * k,
                            &rescored);
    rescored_out->typed_data()[m] = ok ? static_cast<int32_t>(rescored) : -1;
  };
  ParallelFor(pool, rows, pick);  // one row: on this thread
  return ffi::Error::Success();
}

#else
ffi::Error TopKImpl(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                    ffi::Buffer<ffi::S8>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                    ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>, ffi::ResultBuffer<ffi::S32>,
                    ffi::ResultBuffer<ffi::S32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "the top-k kernel needs AVX-512 or AVX2");
}
#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTopKTied, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
