// The two backward products of a bf16 output projection on CPUs with AMX, as one XLA FFI
// custom call (lm/kernels/table_grads.py), for the chunks of the fused loss:
//
//   dx[t, d]      = sum_v g[t, v] E[v, d]          (the input gradient)
//   acc[d, v]    += sum_t x[t, d] g[t, v]          (the table gradient, [D, V], in place)
//
// g is a chunk's bf16 logits gradient [T, V] (V = 50257 for GPT-2), x the chunk's inputs
// [T, D], E the table. XLA's YNNPACK products ran these at 30-40 ms each per 512-token
// chunk where the logits product of the same FLOPs took ~15 ms and oneDNN (PyTorch) 7-10
// ms. Here both products walk g once, in blocks of kBlock vocabulary columns that stay in
// the core's L2 cache: per block the g columns are laid out in AMX's pair-interleaved
// (VNNI) form for the table gradient, and the same block serves the input gradient
// straight from g. AMX tiles: 16 x 16 fp32 accumulators (2 x 2 of them), 16 x 32 bf16
// operands; accumulation is fp32 throughout.
//
// The table arrives pre-interleaved as Evnni [ceil(V/2), D, 2] (E rows 2i and 2i+1 side by
// side, a zero row padding an odd V), prepared once per step in Python. T and D must be
// multiples of 32.

#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "cpu_common.h"

namespace {

#define LM_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))

// vocabulary columns per block (a multiple of 32): per 512-token chunk of GPT-2, 128 / 256 /
// 512 columns took 55.8 / 48.7 / 45.2 ms per chunk, alternated in one process
constexpr int64_t kBlock = 512;

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

// c[32 x 32] (row stride ldc floats) += a[32 x K] (bf16, row stride lda elements) times b
// given pair-interleaved: b2[K/2][32 cols][2] (row stride ldb elements).
LM_AMX inline void Block32(float* c, int64_t ldc, const uint16_t* a, int64_t lda,
                           const uint16_t* b2, int64_t ldb, int64_t k_len) {
  const int64_t sc = ldc * 4, sa = lda * 2, sb = ldb * 2;
  _tile_loadd(0, c, sc);
  _tile_loadd(1, c + 16, sc);
  _tile_loadd(2, c + 16 * ldc, sc);
  _tile_loadd(3, c + 16 * ldc + 16, sc);
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

struct Problem {
  const uint16_t* g;      // [T, V]
  const uint16_t* xt;     // [D, T], x transposed
  const uint32_t* evnni;  // [ceil(V/2), D] pairs
  float* acc;             // [D, V]
  int64_t t, v, d;
};

// One block of columns [v0, v0 + w): the input gradient into dx ([T, D], this task's
// partial sum) and the table gradient into acc's columns.
LM_AMX void DoBlock(const Problem& p, int64_t v0, float* dx) {
  const int64_t w = std::min(kBlock, p.v - v0), wp = (w + 31) / 32 * 32;
  const bool tail = w < kBlock || w % 32;
  // g's columns as pairs of rows side by side: gv[t/2][c] = (g[t][v0+c], g[t+1][v0+c])
  uint32_t* gv = reinterpret_cast<uint32_t*>(Scratch(1, p.t / 2 * kBlock));
  for (int64_t t = 0; t < p.t; t += 2) {
    const uint16_t* r0 = p.g + t * p.v + v0;
    const uint16_t* r1 = r0 + p.v;
    uint32_t* out = gv + t / 2 * kBlock;
    for (int64_t c = 0; c < w; ++c) out[c] = r0[c] | (uint32_t(r1[c]) << 16);
    for (int64_t c = w; c < wp; ++c) out[c] = 0;
  }
  // The input gradient: A = g's block (straight from g unless it is the ragged last one,
  // whose columns past V are zeros in a copy), B = the table's rows v0.. as pairs.
  const uint16_t* a = p.g + v0;
  int64_t lda = p.v;
  const uint32_t* b = p.evnni + (v0 / 2) * p.d;
  if (tail) {
    uint16_t* ga = reinterpret_cast<uint16_t*>(Scratch(2, p.t * kBlock / 2));
    for (int64_t t = 0; t < p.t; ++t) {
      std::memcpy(ga + t * kBlock, p.g + t * p.v + v0, w * 2);
      std::fill(ga + t * kBlock + w, ga + t * kBlock + wp, uint16_t{0});
    }
    uint32_t* eb = reinterpret_cast<uint32_t*>(Scratch(3, wp / 2 * p.d));
    const int64_t pairs = (w + 1) / 2;  // rows of evnni that exist for this block
    std::memcpy(eb, b, pairs * p.d * 4);
    std::fill(eb + pairs * p.d, eb + wp / 2 * p.d, 0u);
    a = ga, lda = kBlock, b = eb;
  }
  for (int64_t t0 = 0; t0 < p.t; t0 += 32)
    for (int64_t d0 = 0; d0 < p.d; d0 += 32)
      Block32(dx + t0 * p.d + d0, p.d, a + t0 * lda, lda,
              reinterpret_cast<const uint16_t*>(b + d0), 2 * p.d, wp);
  // The table gradient: acc[:, v0:v0+w] += xᵀ g_block (through a padded copy of acc's
  // columns for the last block, whose tiles would run past V).
  float* c = p.acc + v0;
  int64_t ldc = p.v;
  if (tail) {
    c = Scratch(4, p.d * kBlock);
    ldc = kBlock;
    for (int64_t d = 0; d < p.d; ++d) {
      std::memcpy(c + d * kBlock, p.acc + d * p.v + v0, w * 4);
      std::fill(c + d * kBlock + w, c + d * kBlock + wp, 0.0f);
    }
  }
  for (int64_t d0 = 0; d0 < p.d; d0 += 32)
    for (int64_t c0 = 0; c0 < wp; c0 += 32)
      Block32(c + d0 * ldc + c0, ldc, p.xt + d0 * p.t, p.t,
              reinterpret_cast<const uint16_t*>(gv + c0), 2 * kBlock, p.t);
  if (tail)
    for (int64_t d = 0; d < p.d; ++d) std::memcpy(p.acc + d * p.v + v0, c + d * kBlock, w * 4);
}

LM_AMX void RunTask(const Problem& p, int64_t b0, int64_t b1, float* dx) {
  ConfigureTiles();
  for (int64_t blk = b0; blk < b1; ++blk) DoBlock(p, blk * kBlock, dx);
  _tile_release();
}

// Linux hands out AMX's tile state only on request (once per process).
bool AmxReady() {
  static const bool ready = [] {
    constexpr long kReqPerm = 0x1023, kXTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE
    return syscall(SYS_arch_prctl, kReqPerm, kXTileData) == 0;
  }();
  return ready;
}

ffi::Error TableGradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> g,
                          ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U32> evnni,
                          ffi::Buffer<ffi::F32> acc_in, ffi::ResultBuffer<ffi::F32> dx,
                          ffi::ResultBuffer<ffi::F32> acc) {
  if (!AmxReady()) return ffi::Error::Internal("the OS did not grant AMX tile state");
  const auto gd = g.dimensions(), xd = x.dimensions(), ad = acc_in.dimensions();
  if (gd.size() != 2 || xd.size() != 2 || ad.size() != 2 || xd[0] != gd[0] ||
      ad[0] != xd[1] || ad[1] != gd[1] || evnni.element_count() != (gd[1] + 1) / 2 * xd[1] ||
      gd[0] % 32 || xd[1] % 32) {
    return ffi::Error::InvalidArgument(
        "need g [T, V], x [T, D], evnni [ceil(V/2), D] pairs, acc [D, V]; T, D % 32 == 0");
  }
  Problem p;
  p.t = gd[0], p.v = gd[1], p.d = xd[1];
  p.g = reinterpret_cast<const uint16_t*>(g.untyped_data());
  p.evnni = reinterpret_cast<const uint32_t*>(evnni.untyped_data());
  p.acc = acc->typed_data();
  if (p.acc != acc_in.typed_data())
    std::memcpy(p.acc, acc_in.typed_data(), p.d * p.v * sizeof(float));
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  std::vector<uint16_t> xt(p.d * p.t);
  for (int64_t t = 0; t < p.t; ++t)
    for (int64_t d = 0; d < p.d; ++d) xt[d * p.t + t] = xs[t * p.d + d];
  p.xt = xt.data();
  // Tasks own contiguous runs of blocks and a partial dx each, summed at the end.
  const int64_t blocks = (p.v + kBlock - 1) / kBlock;
  const int64_t tasks = std::min<int64_t>(blocks, 4 * std::max<int64_t>(pool.num_threads(), 1));
  const int64_t td = p.t * p.d;
  std::vector<float> partial(tasks * td, 0.0f);
  ParallelFor(pool, tasks, [&](int64_t i) {
    RunTask(p, i * blocks / tasks, (i + 1) * blocks / tasks, partial.data() + i * td);
  });
  float* out = dx->typed_data();
  ParallelFor(pool, p.t, [&](int64_t t) {
    float* o = out + t * p.d;
    std::memcpy(o, partial.data() + t * p.d, p.d * 4);
    for (int64_t i = 1; i < tasks; ++i) {
      const float* q = partial.data() + i * td + t * p.d;
      for (int64_t d = 0; d < p.d; ++d) o[d] += q[d];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int LmAmxReady() { return AmxReady() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTableGradsBF16, TableGradsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
