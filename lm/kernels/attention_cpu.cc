// Attention on the CPU as XLA FFI custom calls (lm/kernels/attention.py builds and
// registers them): softmax(scale * q k^T, masked) v with and without its probabilities
// (training / no gradient); the backward pass is in attention_bwd_cpu.cc.
//
// Layouts are the model's own: q [B, L, H, K], k and v [B, S, G, K] (G key/value heads,
// H = R * G query heads), or for self-attention the packed projection [B, L, H + 2G, K]
// (q, k, v heads side by side, as one product computes them; the `Packed` handlers read
// it in place and write its gradient in the same layout, so neither side is sliced or
// concatenated); the mask a bool table [B, L, S], the probabilities [B, H, L, S] (saved
// for the backward pass), the output [B, L, H, K]. One task per (row, head) in
// the forward pass and per (row, key/value head) in the backward pass (so the R query
// heads that share a key/value head accumulate its gradient without races), spread over
// XLA's intra-op thread pool. Each task transposes its keys into a small tile (and copies
// rows into zero-padded tiles only where the head width or key count is not a multiple of
// the vector), only touches the columns between a query's first and last allowed key
// (causal masks: half the work), 4 query rows x 16 (AVX-512) or 8 (AVX2) keys or features
// at a time in registers. A row with no allowed key gets zero probabilities and output.

#include "attention_cpu.h"

namespace {

typedef uint8_t vb __attribute__((vector_size(kLanes)));

// Lanes whose mask byte is non-zero (all bits set) or zero. GCC scalarises the generic
// byte-to-int conversion (one insert per lane), so x86 builds widen with one instruction.
inline vi Allowed(const uint8_t* m) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m))) != 0;
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m))) != 0;
#else
  vb bytes;
  std::memcpy(&bytes, m, sizeof(bytes));
  return __builtin_convertvector(bytes, vi) != 0;
#endif
}

// exp(scale logit - row max) over each row's allowed keys in p[r][lo..hi) (0 elsewhere), the
// kRows rows interleaved (independent dependency chains); inv[r] = 1 / the row's sum (0
// for a row with no allowed key). The caller normalises (rows of p and of p v).
inline void MaskedExp(float* p, const uint8_t* const* mask, int64_t sp, int64_t lo, int64_t hi,
                      float scale, float* inv) {
  vf mx[kRows], sum[kRows];
  for (int r = 0; r < kRows; ++r) {
    mx[r] = Splat(-3.0e38f);
    sum[r] = Splat(0.0f);
  }
  for (int64_t s = lo; s < hi; s += kLanes)
    for (int r = 0; r < kRows; ++r) {
      const vf x = Allowed(mask[r] + s) ? Load(p + r * sp + s) * scale : Splat(-3.0e38f);
      mx[r] = x > mx[r] ? x : mx[r];
    }
  float top[kRows];
  for (int r = 0; r < kRows; ++r) top[r] = HorizontalMax(mx[r]);
  for (int64_t s = lo; s < hi; s += kLanes)
    for (int r = 0; r < kRows; ++r) {
      float* x = p + r * sp + s;
      const vf e = Allowed(mask[r] + s) ? ExpNonPositive(Load(x) * scale - top[r]) : Splat(0.0f);
      Store(x, e);
      sum[r] += e;
    }
  for (int r = 0; r < kRows; ++r) {
    const float total = HorizontalSum(sum[r]);
    inv[r] = total > 0.0f ? 1.0f / total : 0.0f;
  }
}

// The forward pass; the probabilities are written to P unless it is null (no gradient).
// Where the head width is a multiple of kLanes (no padding), query rows are read in place
// and each output row is written straight from the registers, and where the key count is
// one too, so are the values (else a zero-padded tile: the products run over whole vectors
// of keys, and a key past S must contribute 0, not 0 x whatever lies there); the logits
// are scaled inside the softmax.
void Forward(ffi::ThreadPool& pool, const Dims& d, const Layout& lay, const float* Q,
             const float* K, const float* V, ffi::Buffer<ffi::PRED>& allowed, float scale,
             float* O, float* P) {
  const uint8_t* A = reinterpret_cast<const uint8_t*>(allowed.typed_data());
  const int64_t r = d.h / d.g, sp = RoundUp(d.s), kp = RoundUp(d.k);
  const bool in_place = kp == d.k, values_in_place = in_place && sp == d.s;
  const std::vector<int32_t> ranges = AllowedRanges(d, A);
  ParallelFor(pool, d.b * d.h, [&](int64_t task) {
    const int64_t b = task / d.h, h = task % d.h;
    float* kt = Scratch(0, kp * sp);
    float* vv = Scratch(1, sp * kp);
    float* qs = Scratch(2, kRows * kp);
    float* p = Scratch(3, kRows * sp);
    float* o = Scratch(4, kRows * kp);
    uint8_t* mask = reinterpret_cast<uint8_t*>(Scratch(5, kRows * sp / 4));  // bytes
    PackHead(d, K + lay.K(d, b, 0, h / r), lay.kc * d.k, true, kt, sp, kp);
    const float* values = vv;
    int64_t v_stride = kp;
    if (values_in_place) {
      values = V + lay.V(d, b, 0, h / r);
      v_stride = lay.vc * d.k;
    } else {
      PackHead(d, V + lay.V(d, b, 0, h / r), lay.vc * d.k, false, vv, sp, kp);
    }
    const int64_t q_stride = lay.qc * d.k, o_stride = d.h * d.k;
    for (int64_t i0 = 0; i0 < d.l; i0 += kRows) {
      const RowBlock blk(d, A, ranges.data(), b, i0, sp, mask);
      float* out = O + ((b * d.l + i0) * d.h + h) * d.k;
      if (blk.lo >= blk.hi) {  // no allowed key in the block: zeros
        for (int64_t j = 0; j < blk.rows; ++j)
          std::fill(out + j * o_stride, out + j * o_stride + d.k, 0.0f);
        if (P != nullptr)
          for (int64_t j = 0; j < blk.rows; ++j) {
            float* pj = P + ((b * d.h + h) * d.l + i0 + j) * d.s;
            std::fill(pj, pj + d.s, 0.0f);
          }
        continue;
      }
      const float* qrows = Q + lay.Q(d, b, i0, h);
      int64_t qr_stride = q_stride;
      if (!in_place || blk.rows < kRows) {  // a zero-padded copy
        for (int64_t j = 0; j < kRows; ++j) {
          float* qj = qs + j * kp;
          if (j < blk.rows) std::memcpy(qj, qrows + j * q_stride, d.k * sizeof(float));
          else std::fill(qj, qj + d.k, 0.0f);
          std::fill(qj + d.k, qj + kp, 0.0f);
        }
        qrows = qs;
        qr_stride = kp;
      }
      float inv[kRows];
      BlockProduct(qrows, qr_stride, kt, sp, 0, kp, blk.lo, blk.hi, p, sp);
      MaskedExp(p, blk.mask, sp, blk.lo, blk.hi, scale, inv);
      if (in_place) {
        BlockProduct(p, sp, values, v_stride, blk.lo, blk.hi, 0, kp, out, o_stride, inv,
                     blk.rows);
      } else {
        WeightsTimesRows(p, sp, values, v_stride, kp, blk.lo, blk.hi, o);
        for (int64_t j = 0; j < blk.rows; ++j)
          for (int64_t c = 0; c < d.k; ++c) out[j * o_stride + c] = o[j * kp + c] * inv[j];
      }
      if (P == nullptr) continue;
      const int64_t lo = std::min(blk.lo, d.s), hi = std::max(lo, std::min(blk.hi, d.s));
      for (int64_t j = 0; j < blk.rows; ++j) {
        float* pj = P + ((b * d.h + h) * d.l + i0 + j) * d.s;
        const float* src = p + j * sp;
        std::fill(pj, pj + lo, 0.0f);
        int64_t s = lo;
        const vf w = Splat(inv[j]);
        for (; s + kLanes <= hi; s += kLanes) Store(pj + s, Load(src + s) * w);
        for (; s < hi; ++s) pj[s] = src[s] * inv[j];
        std::fill(pj + hi, pj + d.s, 0.0f);
      }
    }
  });
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed, float scale,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs) {
  const Dims d = SeparateDims(q, k);
  Forward(pool, d, Separate(d), q.typed_data(), k.typed_data(), v.typed_data(), allowed, scale,
          out->typed_data(), probs->typed_data());
  return ffi::Error::Success();
}

ffi::Error InferenceImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed, float scale,
                         ffi::ResultBuffer<ffi::F32> out) {
  const Dims d = SeparateDims(q, k);
  Forward(pool, d, Separate(d), q.typed_data(), k.typed_data(), v.typed_data(), allowed, scale,
          out->typed_data(), nullptr);
  return ffi::Error::Success();
}

ffi::Error PackedForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                             ffi::Buffer<ffi::PRED> allowed, float scale, int64_t heads,
                             ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs) {
  const Dims d = PackedDims(qkv, heads);
  const float* x = qkv.typed_data();
  Forward(pool, d, Packed(d), x, x, x, allowed, scale, out->typed_data(), probs->typed_data());
  return ffi::Error::Success();
}

ffi::Error PackedInferenceImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                               ffi::Buffer<ffi::PRED> allowed, float scale, int64_t heads,
                               ffi::ResultBuffer<ffi::F32> out) {
  const Dims d = PackedDims(qkv, heads);
  const float* x = qkv.typed_data();
  Forward(pool, d, Packed(d), x, x, x, allowed, scale, out->typed_data(), nullptr);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionForward, ForwardImpl,
                              SeparateBinding()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionInference, InferenceImpl,
                              SeparateBinding()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionPackedForward, PackedForwardImpl,
                              PackedBinding()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionPackedInference, PackedInferenceImpl,
                              PackedBinding()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>());
