// A bf16 output projection + softmax cross-entropy on CPUs with AMX, as XLA FFI custom
// calls (lm/kernels/amx_projection.py), for the chunks of the fused loss
// (lm/objectives/losses.py). Per chunk of T tokens x [T, D], table E [V, D]:
//
//   logits[t, v] = sum_d x[t, d] E[v, d]                          (fp32, never stored)
//   loss[t]      = (logsumexp_v logits[t] - logits[t, target]) * w[t]
//   g[t, v]      = (softmax(logits[t])_v - onehot(target)_v) * w[t]     (rounded to bf16)
//   dx[t, d]     = sum_v g[t, v] E[v, d]                          (the input gradient)
//   acc[d, v]   += sum_t x[t, d] g[t, v]                          (the table gradient)
//
// XLA's path writes the [T, V] fp32 logits (a GPT-2 chunk: 103 MB) and the bf16 gradient
// to memory and reads them back, and YNNPACK's product for xᵀ g took ~68 ms per 512-token
// chunk where x Eᵀ, the same FLOPs, took ~14 (benchmarks/cpu_ops.py, ops `*_bf16`). Here
// the vocabulary is walked in blocks of columns that stay in the core's L2 cache: per block
// the logits are computed with AMX tiles (16 x 16 fp32 accumulators, 2 x 2 of them, 16 x 32
// bf16 operands, fp32 accumulation), reduced into per-row running max / sum (pass 1), then
// computed again and turned into the gradient block that feeds both backward products
// straight from the cache (pass 2).
//
// The table arrives packed once per step (PackImpl, below): as pairs of columns, cols [D/2, Vp]
// (uint32 words, Vp = V rounded up to 32, zero words past V) for the logits, and as pairs
// of rows, rows [ceil(V/2), D] (a zero row padding an odd V) for g E. T and D must be
// multiples of 32.

#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace {

#define LM_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))

// Vocabulary columns per block (a multiple of 32): the [T, block] fp32 logits, the bf16
// gradient block in two layouts and the table gradient's columns stay in L2 together.
// The GPT-2 fused loss (4 chunks of 512 tokens, value and gradients) took 235-264 ms with
// 256 columns, 277-299 with 512 and 266-289 with 128 (three runs each, alternated), and
// 241-265 ms without software prefetches of the strided table and gradient rows against
// 264-294 with them.
constexpr int64_t kFusedBlock = 256;

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight tiles of 16 rows x 64 bytes: C00 C01 C10 C11 (fp32), A0 A1, B0 B1 (bf16).
LM_AMX void ConfigureTiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

LM_AMX void ReleaseTiles() { _tile_release(); }

// c[32 x 32] (row stride ldc floats) (+)= a[32 x K] (bf16, row stride lda elements) times b
// given as pairs of rows: b2[K/2][32 columns][2] (row stride ldb elements).
template <bool kAccumulate>
LM_AMX inline void Block32(float* c, int64_t ldc, const uint16_t* a, int64_t lda,
                           const uint16_t* b2, int64_t ldb, int64_t k_len) {
  const int64_t sc = ldc * 4, sa = lda * 2, sb = ldb * 2;
  if constexpr (kAccumulate) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + 16, sc);
    _tile_loadd(2, c + 16 * ldc, sc);
    _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < k_len; k += 32) {
    _tile_loadd(4, a + k, sa);
    _tile_loadd(5, a + 16 * lda + k, sa);
    _tile_loadd(6, b2 + (k / 2) * ldb, sb);
    _tile_loadd(7, b2 + (k / 2) * ldb + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + 16, sc);
  _tile_stored(2, c + 16 * ldc, sc);
  _tile_stored(3, c + 16 * ldc + 16, sc);
}

inline const uint16_t* Halves(const uint32_t* p) { return reinterpret_cast<const uint16_t*>(p); }

struct Chunk {
  int64_t t = 0, v = 0, d = 0;
  const uint16_t* x = nullptr;     // [T, D]
  const uint16_t* xt = nullptr;    // [D, T], x transposed (backward)
  const uint32_t* cols = nullptr;  // [D/2, vp] column pairs (logits)
  int64_t vp = 0;
  const uint32_t* rows = nullptr;  // [ceil(V/2), D] row pairs (g E)
  float* acc = nullptr;            // [D, V]
  const int32_t* target = nullptr;
  const float* weight = nullptr;
};

// The backward products of the block of columns [v0, v0 + w): a = its gradient g[:, v0..]
// (bf16, row stride lda, zeros in columns [w, wp)), gv = the same as pairs of rows
// (gv[t/2][c] = g[t][c], g[t+1][c]; row stride ldgv words). dx ([T, D]) += g E_block and
// acc[:, v0 : v0 + w] += xᵀ g.
LM_AMX void Backward(const Chunk& p, int64_t v0, int64_t w, const uint16_t* a, int64_t lda,
                     const uint32_t* gv, int64_t ldgv, float* dx) {
  const int64_t wp = (w + 31) / 32 * 32;
  const uint32_t* b = p.rows + (v0 / 2) * p.d;
  if (v0 + wp > p.v) {
    // the last block: the table's pairs that exist, zeros past them
    uint32_t* eb = reinterpret_cast<uint32_t*>(Scratch(3, wp / 2 * p.d));
    const int64_t pairs = (w + 1) / 2;
    std::memcpy(eb, b, pairs * p.d * 4);
    std::fill(eb + pairs * p.d, eb + wp / 2 * p.d, 0u);
    b = eb;
  }
  for (int64_t t0 = 0; t0 < p.t; t0 += 32)
    for (int64_t d0 = 0; d0 < p.d; d0 += 32)
      Block32<true>(dx + t0 * p.d + d0, p.d, a + t0 * lda, lda, Halves(b + d0), 2 * p.d, wp);
  // through a padded copy of acc's columns for a block whose tiles would run past V
  float* c = p.acc + v0;
  int64_t ldc = p.v;
  const bool ragged = v0 + wp > p.v;
  if (ragged) {
    c = Scratch(4, p.d * wp);
    ldc = wp;
    for (int64_t d = 0; d < p.d; ++d) {
      std::memcpy(c + d * wp, p.acc + d * p.v + v0, w * 4);
      std::fill(c + d * wp + w, c + d * wp + wp, 0.0f);
    }
  }
  for (int64_t d0 = 0; d0 < p.d; d0 += 32)
    for (int64_t c0 = 0; c0 < wp; c0 += 32)
      Block32<true>(c + d0 * ldc + c0, ldc, p.xt + d0 * p.t, p.t, Halves(gv + c0), 2 * ldgv,
                    p.t);
  if (ragged)
    for (int64_t d = 0; d < p.d; ++d) std::memcpy(p.acc + d * p.v + v0, c + d * wp, w * 4);
}

// gv[t/2][c] = (a[t][c], a[t+1][c]) for c < wp (a: bf16, row stride lda).
inline void PairRows(const uint16_t* a, int64_t lda, int64_t t, int64_t wp, uint32_t* gv,
                     int64_t ldgv) {
  for (int64_t r = 0; r < t; r += 2) {
    const uint16_t* r0 = a + r * lda;
    const uint16_t* r1 = r0 + lda;
    uint32_t* out = gv + r / 2 * ldgv;
    for (int64_t c = 0; c < wp; ++c) out[c] = r0[c] | (uint32_t(r1[c]) << 16);
  }
}

// The logits of rows [0, T) and columns [v0, v0 + wp) into l ([T, wp], row stride ld).
LM_AMX void LogitsBlock(const Chunk& p, int64_t v0, int64_t wp, float* l, int64_t ld) {
  for (int64_t t0 = 0; t0 < p.t; t0 += 32)
    for (int64_t c0 = 0; c0 < wp; c0 += 32)
      Block32<false>(l + t0 * ld + c0, ld, p.x + t0 * p.d, p.d, Halves(p.cols + v0 + c0),
                     2 * p.vp, p.d);
}

// Pass 1 over one block: each row's running max m and sum s of exp(logit - m), and the
// target's logit where it falls in the block.
void StatsBlock(const Chunk& p, int64_t v0, int64_t w, const float* l, int64_t ld, float* m,
                float* s, float* target_logit) {
  for (int64_t t = 0; t < p.t; ++t) {
    if (p.weight[t] == 0.0f) continue;
    const float* row = l + t * ld;
    const float bm = RowMax(row, w), mx = bm > m[t] ? bm : m[t];
    const float sum = ExpSum(row, w, mx, nullptr);
    s[t] = s[t] * std::exp(m[t] - mx) + sum;  // exp(-inf) = 0 on the first block
    m[t] = mx;
    const int64_t tg = Clamp(p.target[t], p.v);
    if (tg >= v0 && tg < v0 + w) target_logit[t] = row[tg - v0];
  }
}

// Pass 2 over one block: the gradient rows, exp(logit - max) * (w / sum) - onehot * w, as
// bf16 into ga ([T, wp], zeros in padded columns and in rows of weight 0).
void GradRows(const Chunk& p, int64_t v0, int64_t w, int64_t wp, const float* l, int64_t ld,
              const float* mx, const float* scale, uint16_t* ga) {
  for (int64_t t = 0; t < p.t; ++t) {
    uint16_t* out = ga + t * wp;
    const float wt = p.weight[t];
    if (wt == 0.0f) {
      std::fill(out, out + wp, uint16_t{0});
      continue;
    }
    const float* row = l + t * ld;
    const vf vm = Splat(mx[t]), vs = Splat(scale[t]);
    int64_t j = 0;
    for (; j + kLanes <= w; j += kLanes) StoreBf16(out + j, ExpNonPositive(Load(row + j) - vm) * vs);
    for (; j < w; ++j) out[j] = ToBf16(std::exp(row[j] - mx[t]) * scale[t]);
    std::fill(out + w, out + wp, uint16_t{0});
    const int64_t tg = Clamp(p.target[t], p.v);
    if (tg >= v0 && tg < v0 + w)
      out[tg - v0] = ToBf16(std::exp(row[tg - v0] - mx[t]) * scale[t] - wt);
  }
}

// Linux hands out AMX's tile state only on request (once per process).
bool AmxReady() {
  static const bool ready = [] {
    constexpr long kReqPerm = 0x1023, kXTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE
    return syscall(SYS_arch_prctl, kReqPerm, kXTileData) == 0;
  }();
  return ready;
}

// Tasks own contiguous runs of blocks; returns the number of tasks.
int64_t TaskCount(ffi::ThreadPool& pool, int64_t blocks) {
  return std::min<int64_t>(blocks, 4 * std::max<int64_t>(pool.num_threads(), 1));
}

std::vector<uint16_t> Transposed(const uint16_t* x, int64_t t, int64_t d) {
  std::vector<uint16_t> xt(d * t);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t c = 0; c < d; ++c) xt[c * t + r] = x[r * d + c];
  return xt;
}

// dx = the sum of the tasks' partial sums ([tasks][T * D]).
void SumPartials(ffi::ThreadPool& pool, const std::vector<float>& partial, int64_t tasks,
                 int64_t t, int64_t d, float* dx) {
  const int64_t td = t * d;
  ParallelFor(pool, t, [&](int64_t r) {
    float* o = dx + r * d;
    std::memcpy(o, partial.data() + r * d, d * 4);
    for (int64_t i = 1; i < tasks; ++i) {
      const float* q = partial.data() + i * td + r * d;
      for (int64_t c = 0; c < d; ++c) o[c] += q[c];
    }
  });
}

// The fused chunk: loss and correct per row; with `grads`, also dx and acc += xᵀ g.
template <bool kGrads>
ffi::Error ChunkImpl(ffi::ThreadPool& pool, Chunk p, float* loss, float* correct, float* dx) {
  const int64_t blocks = (p.v + kFusedBlock - 1) / kFusedBlock, tasks = TaskCount(pool, blocks);
  const float inf = std::numeric_limits<float>::infinity();
  // pass 1: per task and row, the running max and sum; per row, the target's logit
  std::vector<float> m(tasks * p.t, -inf), s(tasks * p.t, 0.0f), target_logit(p.t, 0.0f);
  ParallelFor(pool, tasks, [&](int64_t i) {
    float* l = Scratch(5, p.t * kFusedBlock);
    ConfigureTiles();
    for (int64_t b = i * blocks / tasks; b < (i + 1) * blocks / tasks; ++b) {
      const int64_t v0 = b * kFusedBlock, w = std::min(kFusedBlock, p.v - v0);
      const int64_t wp = (w + 31) / 32 * 32;
      LogitsBlock(p, v0, wp, l, wp);
      StatsBlock(p, v0, w, l, wp, m.data() + i * p.t, s.data() + i * p.t, target_logit.data());
    }
    ReleaseTiles();
  });
  std::vector<float> mx(p.t), scale(p.t);
  for (int64_t t = 0; t < p.t; ++t) {
    float top = -inf, sum = 0.0f;
    for (int64_t i = 0; i < tasks; ++i) top = std::max(top, m[i * p.t + t]);
    for (int64_t i = 0; i < tasks; ++i)
      if (s[i * p.t + t] > 0.0f || s[i * p.t + t] != s[i * p.t + t])
        sum += s[i * p.t + t] * std::exp(m[i * p.t + t] - top);
    const float w = p.weight[t], xt = target_logit[t];
    mx[t] = top;
    scale[t] = w / sum;
    loss[t] = w == 0.0f ? 0.0f : (top + std::log(sum) - xt) * w;
    correct[t] = w == 0.0f ? 0.0f : (xt >= top ? 1.0f : 0.0f) * w;  // ties count
  }
  if constexpr (!kGrads) return ffi::Error::Success();
  // pass 2: the logits again, the gradient block, both backward products
  const auto xt = Transposed(p.x, p.t, p.d);
  p.xt = xt.data();
  std::vector<float> partial(tasks * p.t * p.d, 0.0f);
  ParallelFor(pool, tasks, [&](int64_t i) {
    float* l = Scratch(5, p.t * kFusedBlock);
    uint16_t* ga = reinterpret_cast<uint16_t*>(Scratch(2, p.t * kFusedBlock / 2));
    uint32_t* gv = reinterpret_cast<uint32_t*>(Scratch(1, p.t / 2 * kFusedBlock));
    ConfigureTiles();
    for (int64_t b = i * blocks / tasks; b < (i + 1) * blocks / tasks; ++b) {
      const int64_t v0 = b * kFusedBlock, w = std::min(kFusedBlock, p.v - v0);
      const int64_t wp = (w + 31) / 32 * 32;
      LogitsBlock(p, v0, wp, l, wp);
      GradRows(p, v0, w, wp, l, wp, mx.data(), scale.data(), ga);
      PairRows(ga, wp, p.t, wp, gv, wp);
      Backward(p, v0, w, ga, wp, gv, wp, partial.data() + i * p.t * p.d);
    }
    ReleaseTiles();
  });
  SumPartials(pool, partial, tasks, p.t, p.d, dx);
  return ffi::Error::Success();
}

ffi::Error CheckChunk(ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::S32>& targets,
                      ffi::Buffer<ffi::F32>& weights, ffi::Buffer<ffi::U32>& cols, int64_t v,
                      Chunk* p) {
  const auto xd = x.dimensions(), cd = cols.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || cd[0] * 2 != xd[1] || cd[1] != (v + 31) / 32 * 32 ||
      targets.element_count() != xd[0] || weights.element_count() != xd[0] || xd[0] % 32 ||
      xd[1] % 32 || v < 1) {
    return ffi::Error::InvalidArgument(
        "need x [T, D], targets and weights [T], cols [D/2, V rounded up to 32] pairs; "
        "T, D % 32 == 0");
  }
  p->t = xd[0], p->d = xd[1], p->v = v, p->vp = cd[1];
  p->x = reinterpret_cast<const uint16_t*>(x.untyped_data());
  p->cols = reinterpret_cast<const uint32_t*>(cols.untyped_data());
  p->target = targets.typed_data();
  p->weight = weights.typed_data();
  return ffi::Error::Success();
}

ffi::Error ChunkStatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                          ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                          ffi::Buffer<ffi::U32> cols, ffi::ResultBuffer<ffi::F32> loss,
                          ffi::ResultBuffer<ffi::F32> correct, int64_t vocab) {
  if (!AmxReady()) return ffi::Error::Internal("the OS did not grant AMX tile state");
  Chunk p;
  if (auto e = CheckChunk(x, targets, weights, cols, vocab, &p); e.failure()) return e;
  return ChunkImpl<false>(pool, p, loss->typed_data(), correct->typed_data(), nullptr);
}

ffi::Error ChunkGradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                          ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                          ffi::Buffer<ffi::U32> cols, ffi::Buffer<ffi::U32> rows,
                          ffi::Buffer<ffi::F32> acc_in, ffi::ResultBuffer<ffi::F32> loss,
                          ffi::ResultBuffer<ffi::F32> correct, ffi::ResultBuffer<ffi::F32> dx,
                          ffi::ResultBuffer<ffi::F32> acc) {
  if (!AmxReady()) return ffi::Error::Internal("the OS did not grant AMX tile state");
  const auto ad = acc_in.dimensions();
  Chunk p;
  if (ad.size() != 2) return ffi::Error::InvalidArgument("acc must be [D, V]");
  if (auto e = CheckChunk(x, targets, weights, cols, ad[1], &p); e.failure()) return e;
  if (ad[0] != p.d || rows.element_count() != (p.v + 1) / 2 * p.d)
    return ffi::Error::InvalidArgument("need rows [ceil(V/2), D] pairs and acc [D, V]");
  p.rows = reinterpret_cast<const uint32_t*>(rows.untyped_data());
  p.acc = acc->typed_data();
  if (p.acc != acc_in.typed_data())
    std::memcpy(p.acc, acc_in.typed_data(), p.d * p.v * sizeof(float));
  return ChunkImpl<true>(pool, p, loss->typed_data(), correct->typed_data(),
                         dx->typed_data());
}

// The table [V, D] as column pairs [D/2, vp] (zero words past V) and as row pairs
// [ceil(V/2), D] (a zero row padding an odd V), once per step. XLA's transpose for the
// first took ~25 ms on GPT-2's table.
ffi::Error PackImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> table,
                    ffi::ResultBuffer<ffi::U32> cols, ffi::ResultBuffer<ffi::U32> rows) {
  const auto td = table.dimensions(), cd = cols->dimensions(), rd = rows->dimensions();
  if (td.size() != 2 || td[1] % 2 || cd.size() != 2 || rd.size() != 2 ||
      cd[0] * 2 != td[1] || cd[1] != (td[0] + 31) / 32 * 32 || rd[0] != (td[0] + 1) / 2 ||
      rd[1] != td[1]) {
    return ffi::Error::InvalidArgument("need table [V, D] (D even), cols [D/2, V rounded up "
                                       "to 32], rows [ceil(V/2), D]");
  }
  const int64_t v = td[0], d = td[1], vp = cd[1], half = d / 2;
  const auto* e = reinterpret_cast<const uint16_t*>(table.untyped_data());
  const auto* words = reinterpret_cast<const uint32_t*>(e);  // [V, D/2]
  uint32_t* c = cols->typed_data();
  uint32_t* r = rows->typed_data();
  constexpr int64_t kTile = 64;  // vocabulary rows per task
  const int64_t vt = (vp + kTile - 1) / kTile;
  ParallelFor(pool, vt + (v + 1) / 2 / kTile + 1, [&](int64_t task) {
    if (task < vt) {  // column pairs: a transpose of 32-bit words, 16 table rows at a time
      // (each output row gets 16 consecutive words: one cache line per write)
      for (int64_t j0 = task * kTile; j0 < std::min((task + 1) * kTile, vp); j0 += 16) {
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, v - j0));
        for (int64_t i = 0; i < half; ++i) {
          uint32_t* out = c + i * vp + j0;
          for (int64_t jj = 0; jj < n; ++jj) out[jj] = words[(j0 + jj) * half + i];
          for (int64_t jj = n; jj < 16; ++jj) out[jj] = 0u;
        }
      }
      return;
    }
    const int64_t p0 = (task - vt) * kTile, p1 = std::min(p0 + kTile, (v + 1) / 2);
    for (int64_t p = p0; p < p1; ++p) {  // row pairs
      const uint16_t* a = e + 2 * p * d;
      uint32_t* out = r + p * d;
      if (2 * p + 1 < v) {
        const uint16_t* b = a + d;
        for (int64_t k = 0; k < d; ++k) out[k] = a[k] | (uint32_t(b[k]) << 16);
      } else {
        for (int64_t k = 0; k < d; ++k) out[k] = a[k];
      }
    }
  });
  return ffi::Error::Success();
}

// The chunk handlers' common arguments: x, targets, weights and the column pairs.
auto ChunkBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::U32>>();
}

}  // namespace

extern "C" int LmAmxReady() { return AmxReady() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAmxChunkStatsBF16, ChunkStatsImpl,
                              ChunkBinding()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("vocab"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAmxChunkGradsBF16, ChunkGradsImpl,
                              ChunkBinding()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAmxPackBF16, PackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>());
