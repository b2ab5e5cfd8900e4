// The backward pass of the attention kernels in attention_cpu.cc (same layouts): the
// gradients of q, k and v from the saved probabilities and the output's gradient, one
// task per (row, key/value head). `BackwardInPlace` where the head width and key count
// are multiples of the vector; otherwise `Backward` on zero-padded tiles.

#include "attention_cpu.h"

namespace {

// acc[s][0..kp) += sum_r w[r][s] * x[r][0..kp) for s in [lo, hi) (the padded path's
// transposed products behind the gradients of keys and values).
inline void AccumulateTransposed(const float* w, int64_t sp, const float* x, int64_t kp,
                                 int64_t lo, int64_t hi, float* acc) {
  for (int64_t c0 = 0; c0 < kp; c0 += kLanes) {
    const vf x0 = Load(x + c0), x1 = Load(x + kp + c0), x2 = Load(x + 2 * kp + c0),
              x3 = Load(x + 3 * kp + c0);
    for (int64_t s = lo; s < hi; ++s) {
      float* a = acc + s * kp + c0;
      Store(a, Load(a) + w[s] * x0 + w[sp + s] * x1 + w[2 * sp + s] * x2 + w[3 * sp + s] * x3);
    }
  }
}

inline float Dot(const float* x, const float* y, int64_t lo, int64_t hi) {
  vf acc{};
  for (int64_t s = lo; s < hi; s += kLanes) acc += Load(x + s) * Load(y + s);
  return HorizontalSum(acc);
}

// out_t[c][s] += sum_{i in [i0, i1)} w[i][s] x[i][c] for the kLanes keys s from s0 and the
// F features c from c0: one vector of keys per feature in registers, w's rows read as
// vectors and x's elements broadcast (the transposed products behind dK and dV, without
// transposing dS or P).
template <int F>
inline void ColumnProduct(const float* w, int64_t w_stride, const float* x, int64_t x_stride,
                          int64_t i0, int64_t i1, int64_t s0, int64_t c0, float* out_t,
                          int64_t out_stride) {
  vf acc[F];
  for (int f = 0; f < F; ++f) acc[f] = Load(out_t + (c0 + f) * out_stride + s0);
  for (int64_t i = i0; i < i1; ++i) {
    const vf wv = Load(w + i * w_stride + s0);
    const float* xi = x + i * x_stride + c0;
    for (int f = 0; f < F; ++f) acc[f] += xi[f] * wv;
  }
  for (int f = 0; f < F; ++f) Store(out_t + (c0 + f) * out_stride + s0, acc[f]);
}

// The backward pass where neither the head width nor the key count needs padding (both
// multiples of kLanes): every row is read where it lies. Per (row, key/value head) and
// each of its query heads, by blocks of kRows query rows: dP = dO Vᵀ, dS = P (dP -
// rowsum(P dP)) scale (kept for the whole head), dQ = dS K written straight to DQ; then
// dKᵀ += dSᵀ Q and dVᵀ += Pᵀ dO by vectors of kLanes keys, each only over the query rows
// from the first one that attends to it; dK and dV transposed into place once.
void BackwardInPlace(ffi::ThreadPool& pool, const Dims& d, const Layout& lay, const float* Q,
                     const float* K, const float* V, const uint8_t* A, const float* P,
                     const float* DO, float scale, float* DQ, float* DK, float* DV) {
  constexpr int F = kLanes;  // features per ColumnProduct: F + 1 vectors in registers
  const int64_t r = d.h / d.g, sp = d.s, kp = d.k, lp = (d.l + kRows - 1) / kRows * kRows;
  const std::vector<int32_t> ranges = AllowedRanges(d, A);
  ParallelFor(pool, d.b * d.g, [&](int64_t task) {
    const int64_t b = task / d.g, g = task % d.g;
    float* vt = Scratch(0, kp * sp);
    float* dk_t = Scratch(1, kp * sp);
    float* dv_t = Scratch(2, kp * sp);
    float* ds_all = Scratch(3, lp * sp);
    float* dos = Scratch(4, kRows * kp);
    float* p = Scratch(5, kRows * sp);
    uint8_t* mask = reinterpret_cast<uint8_t*>(Scratch(9, kRows * sp / 4));  // bytes
    PackHead(d, V + lay.V(d, b, 0, g), lay.vc * d.k, true, vt, sp, kp);
    const float* krows = K + lay.K(d, b, 0, g);
    const int64_t k_stride = lay.kc * d.k, q_stride = lay.qc * d.k, do_stride = d.h * d.k;
    std::fill(dk_t, dk_t + kp * sp, 0.0f);
    std::fill(dv_t, dv_t + kp * sp, 0.0f);
    // The first query row attending to each vector of keys (the same for every head).
    std::vector<int64_t> first_row(sp / kLanes, d.l);
    for (int64_t i0 = 0; i0 < d.l; i0 += kRows) {
      const RowBlock blk(d, A, ranges.data(), b, i0, sp, mask);
      for (int64_t s0 = blk.lo; s0 < blk.hi; s0 += kLanes)
        first_row[s0 / kLanes] = std::min(first_row[s0 / kLanes], i0);
    }
    for (int64_t h = g * r; h < (g + 1) * r; ++h) {
      const float* p_head = P + (b * d.h + h) * d.l * d.s;
      const float* do_head = DO + (b * d.l * d.h + h) * d.k;
      for (int64_t i0 = 0; i0 < d.l; i0 += kRows) {
        const RowBlock blk(d, A, ranges.data(), b, i0, sp, mask);
        float* ds = ds_all + i0 * sp;
        float* dq = DQ + lay.Q(d, b, i0, h);
        if (blk.lo >= blk.hi) {  // no allowed key: dS and dQ zero
          std::fill(ds, ds + kRows * sp, 0.0f);
          for (int64_t j = 0; j < blk.rows; ++j)
            std::fill(dq + j * q_stride, dq + j * q_stride + d.k, 0.0f);
          continue;
        }
        const float* do_rows = do_head + i0 * do_stride;
        const float* p_rows = p_head + i0 * d.s;
        int64_t dr_stride = do_stride;
        if (blk.rows < kRows) {  // the last, partial block: zero-padded copies
          for (int64_t j = 0; j < kRows; ++j) {
            if (j < blk.rows) {
              std::memcpy(dos + j * kp, do_rows + j * do_stride, kp * sizeof(float));
              std::memcpy(p + j * sp, p_rows + j * d.s, sp * sizeof(float));
            } else {
              std::fill(dos + j * kp, dos + (j + 1) * kp, 0.0f);
              std::fill(p + j * sp, p + (j + 1) * sp, 0.0f);
            }
          }
          do_rows = dos;
          dr_stride = kp;
          p_rows = p;
        }
        BlockProduct(do_rows, dr_stride, vt, sp, 0, kp, blk.lo, blk.hi, ds, sp);
        for (int j = 0; j < kRows; ++j) {
          float* dsj = ds + j * sp;
          const float* pj = p_rows + j * sp;
          const float dot = Dot(pj, dsj, blk.lo, blk.hi);
          for (int64_t s = blk.lo; s < blk.hi; s += kLanes)
            Store(dsj + s, Load(pj + s) * (Load(dsj + s) - dot) * scale);
          std::fill(dsj, dsj + blk.lo, 0.0f);
          std::fill(dsj + blk.hi, dsj + sp, 0.0f);
        }
        BlockProduct(ds, sp, krows, k_stride, blk.lo, blk.hi, 0, kp, dq, q_stride, nullptr,
                     blk.rows);
      }
      const float* q_head = Q + lay.Q(d, b, 0, h);
      for (int64_t s0 = 0; s0 < sp; s0 += kLanes) {
        const int64_t i0 = first_row[s0 / kLanes];
        for (int64_t c0 = 0; c0 < kp && i0 < d.l; c0 += F) {
          ColumnProduct<F>(ds_all, sp, q_head, q_stride, i0, d.l, s0, c0, dk_t, sp);
          ColumnProduct<F>(p_head, d.s, do_head, do_stride, i0, d.l, s0, c0, dv_t, sp);
        }
      }
    }
    TransposeRows(dk_t, sp, 0, d.k, d.s, DK + lay.K(d, b, 0, g), lay.kc * d.k);
    TransposeRows(dv_t, sp, 0, d.k, d.s, DV + lay.V(d, b, 0, g), lay.vc * d.k);
  });
}

// The gradients of q, k and v, written in `lay` like their inputs (every element once).
void Backward(ffi::ThreadPool& pool, const Dims& d, const Layout& lay, const float* Q,
              const float* K, const float* V, ffi::Buffer<ffi::PRED>& allowed, const float* P,
              const float* DO, float scale, float* DQ, float* DK, float* DV) {
  const uint8_t* A = reinterpret_cast<const uint8_t*>(allowed.typed_data());
  if (d.k % kLanes == 0 && d.s % kLanes == 0 && d.s > 0)
    return BackwardInPlace(pool, d, lay, Q, K, V, A, P, DO, scale, DQ, DK, DV);
  const int64_t r = d.h / d.g, sp = RoundUp(d.s), kp = RoundUp(d.k);
  const std::vector<int32_t> ranges = AllowedRanges(d, A);
  ParallelFor(pool, d.b * d.g, [&](int64_t task) {
    const int64_t b = task / d.g, g = task % d.g;
    float* vt = Scratch(0, kp * sp);
    float* kk = Scratch(1, sp * kp);
    float* dk_acc = Scratch(2, sp * kp);
    float* dv_acc = Scratch(3, sp * kp);
    float* qs = Scratch(4, kRows * kp);
    float* dos = Scratch(5, kRows * kp);
    float* p = Scratch(6, kRows * sp);
    float* ds = Scratch(7, kRows * sp);
    float* dqs = Scratch(8, kRows * kp);
    uint8_t* mask = reinterpret_cast<uint8_t*>(Scratch(9, kRows * sp / 4));  // bytes
    PackHead(d, V + lay.V(d, b, 0, g), lay.vc * d.k, true, vt, sp, kp);
    PackHead(d, K + lay.K(d, b, 0, g), lay.kc * d.k, false, kk, sp, kp);
    std::fill(dk_acc, dk_acc + sp * kp, 0.0f);
    std::fill(dv_acc, dv_acc + sp * kp, 0.0f);
    std::fill(qs, qs + kRows * kp, 0.0f);  // the feature padding [K, kp) stays zero
    std::fill(dos, dos + kRows * kp, 0.0f);
    for (int64_t h = g * r; h < (g + 1) * r; ++h) {
      for (int64_t i0 = 0; i0 < d.l; i0 += kRows) {
        const RowBlock blk(d, A, ranges.data(), b, i0, sp, mask);
        if (blk.lo < blk.hi) {
          const int64_t hi_s = std::max(blk.lo, std::min(blk.hi, d.s));
          for (int64_t j = 0; j < kRows; ++j) {
            const int64_t row = (b * d.l + i0 + j) * d.h + h;  // of dout [B, L, H, K]
            const bool real = j < blk.rows;
            if (real) {
              std::memcpy(qs + j * kp, Q + lay.Q(d, b, i0 + j, h), d.k * sizeof(float));
              std::memcpy(dos + j * kp, DO + row * d.k, d.k * sizeof(float));
            } else {
              std::fill(qs + j * kp, qs + (j + 1) * kp, 0.0f);
              std::fill(dos + j * kp, dos + (j + 1) * kp, 0.0f);
            }
            float* pj = p + j * sp;
            if (real && blk.lo < hi_s)
              std::memcpy(pj + blk.lo, P + ((b * d.h + h) * d.l + i0 + j) * d.s + blk.lo,
                          (hi_s - blk.lo) * sizeof(float));
            std::fill(pj + (real ? hi_s : blk.lo), pj + blk.hi, 0.0f);
          }
          // dlogits = p * (dp - sum(p * dp)) * scale, dp = dout v^T.
          RowsTimesColumns(dos, kp, vt, sp, blk.lo, blk.hi, ds);
          for (int j = 0; j < kRows; ++j) {
            float* dsj = ds + j * sp;
            const float* pj = p + j * sp;
            const float dot = Dot(pj, dsj, blk.lo, blk.hi);
            for (int64_t s = blk.lo; s < blk.hi; s += kLanes)
              Store(dsj + s, Load(pj + s) * (Load(dsj + s) - dot) * scale);
          }
          WeightsTimesRows(ds, sp, kk, kp, kp, blk.lo, blk.hi, dqs);
          AccumulateTransposed(ds, sp, qs, kp, blk.lo, blk.hi, dk_acc);
          AccumulateTransposed(p, sp, dos, kp, blk.lo, blk.hi, dv_acc);
        } else {
          std::fill(dqs, dqs + kRows * kp, 0.0f);
        }
        for (int64_t j = 0; j < blk.rows; ++j)
          std::memcpy(DQ + lay.Q(d, b, i0 + j, h), dqs + j * kp, d.k * sizeof(float));
      }
    }
    for (int64_t s = 0; s < d.s; ++s) {
      std::memcpy(DK + lay.K(d, b, s, g), dk_acc + s * kp, d.k * sizeof(float));
      std::memcpy(DV + lay.V(d, b, s, g), dv_acc + s * kp, d.k * sizeof(float));
    }
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed,
                        ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> dout, float scale,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = SeparateDims(q, k);
  Backward(pool, d, Separate(d), q.typed_data(), k.typed_data(), v.typed_data(), allowed,
           probs.typed_data(), dout.typed_data(), scale, dq->typed_data(), dk->typed_data(),
           dv->typed_data());
  return ffi::Error::Success();
}

ffi::Error PackedBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                              ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::F32> probs,
                              ffi::Buffer<ffi::F32> dout, float scale, int64_t heads,
                              ffi::ResultBuffer<ffi::F32> dqkv) {
  const Dims d = PackedDims(qkv, heads);
  const float* x = qkv.typed_data();
  float* dx = dqkv->typed_data();
  Backward(pool, d, Packed(d), x, x, x, allowed, probs.typed_data(), dout.typed_data(), scale,
           dx, dx, dx);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionBackward, BackwardImpl,
                              SeparateBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionPackedBackward, PackedBackwardImpl,
                              PackedBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>());
