// Decode-sized dense products on x86 CPUs: y = x . w for a few rows of x, streaming w once.
//
// XLA:CPU runs bf16 dots an order of magnitude slower than f32 ones, and its f32 GEMM path
// reads small-M products well below memory speed. These kernels read each weight once per call
// (bf16 weights are widened to f32 exactly, a 16-bit shift), keep every row of x against the
// weight vector in registers, and accumulate in f32. x and y are f32.
//
//   gemma_dense_minor_{f32,bf16}:  y[m, v] = sum_d x[m, d] * w[v, d]   (w [V, D], the tied embedding)
//   gemma_dense_major_{f32,bf16}:  y[m, v] = sum_d x[m, d] * w[d, v]   (w [D, V], projections and MLP)
//
// Work is split into chunks of contiguous weight rows, claimed from an atomic counter by the
// calling thread and by tasks on XLA's intra-op thread pool: no second thread pool competes with
// XLA's, and a task that starts late finds nothing left and returns. Results do not depend on
// which thread ran which chunk (every output is summed in one fixed order): bitwise reproducible.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPrefetch = 4096;  // bytes ahead of the weight stream to prefetch (best of 1-16 KB here)

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// 16 weights -> 16 f32 lanes (bf16 widened exactly); `n` < 16 loads a masked tail.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
inline __m512 load16(const uint16_t* p, int64_t n) {
  __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// y[m, v] for v in [v0, v1), MM rows of x at once, R weight rows per register tile.
template <int MM, typename W>
void minor_rows(const float* X, const W* Wt, float* Y, int64_t D, int64_t V, int64_t v0, int64_t v1) {
  constexpr int R = MM <= 4 ? 1 : 2;
  int64_t v = v0;
  auto tile = [&](auto rows_tag) {
    constexpr int RR = decltype(rows_tag)::value;
    __m512 acc[RR][MM];
    for (int r = 0; r < RR; ++r)
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      __m512 w[RR];
      for (int r = 0; r < RR; ++r) {
        w[r] = load16(Wt + (v + r) * D + d);
        _mm_prefetch(reinterpret_cast<const char*>(Wt + (v + r) * D + d) + kPrefetch, _MM_HINT_T0);
      }
      for (int m = 0; m < MM; ++m) {
        __m512 x = _mm512_loadu_ps(X + m * D + d);
        for (int r = 0; r < RR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], x, acc[r][m]);
      }
    }
    if (d < D) {
      __m512 w[RR];
      for (int r = 0; r < RR; ++r) w[r] = load16(Wt + (v + r) * D + d, D - d);
      for (int m = 0; m < MM; ++m) {
        __m512 x = _mm512_maskz_loadu_ps(tail_mask(D - d), X + m * D + d);
        for (int r = 0; r < RR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], x, acc[r][m]);
      }
    }
    for (int r = 0; r < RR; ++r)
      for (int m = 0; m < MM; ++m) Y[m * V + v + r] = _mm512_reduce_add_ps(acc[r][m]);
  };
  for (; v + R <= v1; v += R) tile(std::integral_constant<int, R>{});
  for (; v < v1; ++v) tile(std::integral_constant<int, 1>{});
}

// acc[m, v] += sum_{d in [d0, d1)} x[m, d] * w[d, v], MM rows of x at once, 8 weight rows per pass.
// A group is CW vectors of 16 columns: each broadcast x[m, d] feeds CW FMAs, and each acc vector
// takes its 8 products in two independent chains (one chain of 8 FMAs is bound by FMA latency).
// Rows stream in memory order; the next pass is prefetched.
template <int RR, int CW, int MM, bool kTail, typename W>
inline void major_group(const float* X, const W* row, float* acc, int64_t ldy, int64_t D, int64_t V, int64_t d,
                        int64_t v) {
  const int64_t n = V - v;  // kTail: one vector, n < 16 columns
  __m512 w[RR][CW];
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r) {
#pragma GCC unroll 2
    for (int c = 0; c < CW; ++c) w[r][c] = kTail ? load16(row + r * V + v, n) : load16(row + r * V + v + 16 * c);
    _mm_prefetch(reinterpret_cast<const char*>(row + (r + RR) * V + v), _MM_HINT_T0);
    if (CW * 16 * sizeof(W) > 64) _mm_prefetch(reinterpret_cast<const char*>(row + (r + RR) * V + v) + 64, _MM_HINT_T0);
  }
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m) {
    const float* xm = X + m * D + d;
    float* a = acc + m * ldy + v;
    __m512 even[CW], odd[CW];
#pragma GCC unroll 2
    for (int c = 0; c < CW; ++c) {
      even[c] = kTail ? _mm512_maskz_loadu_ps(tail_mask(n), a) : _mm512_loadu_ps(a + 16 * c);
      odd[c] = _mm512_setzero_ps();
    }
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      __m512 xb = _mm512_set1_ps(xm[r]);
#pragma GCC unroll 2
      for (int c = 0; c < CW; ++c) {
        if (r % 2 == 0) even[c] = _mm512_fmadd_ps(w[r][c], xb, even[c]);
        else odd[c] = _mm512_fmadd_ps(w[r][c], xb, odd[c]);
      }
    }
#pragma GCC unroll 2
    for (int c = 0; c < CW; ++c) {
      __m512 y = _mm512_add_ps(even[c], odd[c]);
      if (kTail) _mm512_mask_storeu_ps(a, tail_mask(n), y); else _mm512_storeu_ps(a + 16 * c, y);
    }
  }
}

// acc[m, v] += sum over the RR weight rows from d of x[m, d] * w[d, v], for the MM rows of x at X.
template <int RR, int MM, typename W>
void major_pass(const float* X, const W* Wt, float* acc, int64_t ldy, int64_t D, int64_t V, int64_t d) {
  const W* row = Wt + d * V;
  int64_t v = 0;
  for (; v + 32 <= V; v += 32) major_group<RR, 2, MM, false>(X, row, acc, ldy, D, V, d, v);
  for (; v + 16 <= V; v += 16) major_group<RR, 1, MM, false>(X, row, acc, ldy, D, V, d, v);
  if (v < V) major_group<RR, 1, MM, true>(X, row, acc, ldy, D, V, d, v);
}

// acc[m, v] += sum_{d in [d0, d1)} x[m, d] * w[d, v] for all M rows. Each pass of 8 weight rows (8 * V
// weights, cache-resident) serves every group of 8 rows of x before the next pass is read, so the
// weights stream from memory once whatever M; each output's sum order is the same as group-outer.
template <typename W>
void major_rows(const float* X, const W* Wt, float* acc, int64_t ldy, int64_t M, int64_t D, int64_t V, int64_t d0,
                int64_t d1) {
  int64_t d = d0;
  for (; d + 8 <= d1; d += 8)
    by_row_groups(M, [&](int64_t m0, auto mm) {
      major_pass<8, decltype(mm)::value>(X + m0 * D, Wt, acc + m0 * ldy, ldy, D, V, d);
    });
  for (; d < d1; ++d)
    by_row_groups(M, [&](int64_t m0, auto mm) {
      major_pass<1, decltype(mm)::value>(X + m0 * D, Wt, acc + m0 * ldy, ldy, D, V, d);
    });
}

// y [M, V] = x [M, D] . w [V, D]^T: chunks of whole weight rows, one y column block each.
template <typename W>
void dense_minor(ffi::ThreadPool& pool, const float* X, const W* Wt, float* Y, int64_t M, int64_t D, int64_t V,
                 int64_t threads) {
  const int64_t rows = chunk_rows(V, D * sizeof(W), threads, 16);
  const int64_t chunks = (V + rows - 1) / rows;
  parallel_chunks(pool, chunks, threads, [&](int64_t c) {
    by_row_groups(M, [&](int64_t m0, auto mm) {
      minor_rows<decltype(mm)::value>(X + m0 * D, Wt, Y + m0 * V, D, V, c * rows, std::min(V, (c + 1) * rows));
    });
  });
}

// y [M, V] = x [M, D] . w [D, V]: kChunksPerThread chunks of whole weight rows per thread (rows
// stream in memory order). Each chunk sums into its own partial y (padded rows: rows V floats apart alias in
// the 4 KB store-to-load check when V is a multiple of 1024), and the partials are added in chunk
// order, so every output is summed in the same order whichever thread ran which chunk.
constexpr int64_t kChunksPerThread = 1;  // measured best of 1, 2 and 4: fewer partial sums to write and add

template <typename W>
void dense_major(ffi::ThreadPool& pool, const float* X, const W* Wt, float* Y, int64_t M, int64_t D, int64_t V,
                 int64_t threads) {
  const int64_t wanted = std::max<int64_t>(1, std::min((D + 7) / 8, kChunksPerThread * threads));
  const int64_t rows = std::max<int64_t>(8, ((D + wanted - 1) / wanted + 7) / 8 * 8);
  const int64_t chunks = (D + rows - 1) / rows;
  const int64_t ldy = V + 16;
  thread_local std::vector<float> scratch;  // reused: a fresh buffer per call costs page faults
  if (static_cast<int64_t>(scratch.size()) < chunks * M * ldy) scratch.resize(chunks * M * ldy);
  float* partial = scratch.data();
  parallel_chunks(pool, chunks, threads, [&](int64_t c) {
    float* acc = partial + c * M * ldy;
    std::fill(acc, acc + M * ldy, 0.0f);
    major_rows(X, Wt, acc, ldy, M, D, V, c * rows, std::min(D, (c + 1) * rows));
  });
  for (int64_t m = 0; m < M; ++m)
    for (int64_t v = 0; v < V; ++v) {
      float sum = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) sum += partial[(c * M + m) * ldy + v];
      Y[m * V + v] = sum;
    }
}

#ifdef __AVX512BF16__
// ---- bf16 activations against bf16 weights: vdpbf16ps, 32 multiply-adds an instruction ------------
//
// A bf16 model's activations are bf16 already, so x need not be widened: each vdpbf16ps multiplies 16
// pairs of bf16 (x[m, d], x[m, d + 1]) by (w[d, v], w[d + 1, v]) and adds both products to an f32 lane,
// twice the multiply-adds of an f32 FMA on the same port. Rows of x stay in registers against each
// weight vector, so above a few rows the products are bound by these instructions, not by memory.
// Every output is summed over d in one fixed order (pairs from d = 0 up; the minor layout's 16 lanes
// then in one fixed tree): a row's result never depends on the other rows or on the thread count.

inline __mmask32 tail_mask32(int64_t n) {
  return n >= 32 ? 0xFFFFFFFFu : n <= 0 ? 0u : static_cast<__mmask32>((1ull << n) - 1);
}
inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// The lane sums of 16 vectors, as one vector: lane L = sum of v[T(L)]'s lanes, T(4i + j) = 4j + i, each
// vector summed in the same tree (lane j + lane j+8, then +4, +2, +1) whatever it sits beside.
__attribute__((always_inline)) inline __m512 reduce16(const __m512 (&v)[16]) {
  __m512 c[8], d[4], e[2];
  for (int k = 0; k < 8; ++k)
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44), _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)
    d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88), _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)
    e[k] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * k], d[2 * k + 1], 0x44), _mm512_shuffle_ps(d[2 * k], d[2 * k + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}
constexpr int transposed4(int p) { return (p % 4) * 4 + p / 4; }

// x is packed once per call so that a tile reads all its rows of x from one pointer at fixed offsets (rows
// of x at separate pointers ran the kernels out of registers: pointers spilled to the stack in the inner loops).

// Minor: xp[(d / 32) * M + m] = x[m, d:d + 32] (zero-padded), 64 bytes each.
void pack_minor(const uint16_t* X, int64_t M, int64_t D, std::vector<uint16_t>& xp) {
  const int64_t steps = (D + 31) / 32;
  xp.assign(steps * M * 32, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t d = 0; d < D; ++d) xp[((d / 32) * M + m) * 32 + d % 32] = X[m * D + d];
}

// Major: xp[(d / 2) * M + m] = the pair (x[m, d], x[m, d + 1]) as 32 bits (x[m, d] low; (x, 0) past D).
void pack_major(const uint16_t* X, int64_t M, int64_t D, std::vector<uint32_t>& xp) {
  const int64_t pairs = (D + 1) / 2;
  xp.assign(pairs * M, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t d = 0; d < D; ++d) xp[(d / 2) * M + m] |= static_cast<uint32_t>(X[m * D + d]) << (16 * (d % 2));
}

constexpr int64_t kPrefetchRows = 16;  // the minor tiles prefetch the next 16-row block (into L2: L1 holds this one)

// Minor layout (w [V, D]): y[m, v + r] for MM rows of x (packed, M per step) and RR weight rows, RR * MM <= 16
// accumulators.
template <int MM, int RR>
inline void bx_minor_tile(const uint16_t* xp, int64_t M, const uint16_t* Wt, float* Y, int64_t D, int64_t V, int64_t v) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const uint16_t* w0 = Wt + v * D;
  const int64_t ahead = kPrefetchRows * D;  // elements
  for (int64_t d = 0; d < D; d += 32, xp += 32 * M) {
    const __mmask32 k = tail_mask32(D - d);
    __m512i w[RR];
#pragma GCC unroll 16
    for (int r = 0; r < RR; ++r) {
      w[r] = _mm512_maskz_loadu_epi16(k, w0 + r * D + d);
      _mm_prefetch(reinterpret_cast<const char*>(w0 + r * D + d + ahead), _MM_HINT_T1);
    }
#pragma GCC unroll 16
    for (int m = 0; m < MM; ++m) {
      const __m512i x = _mm512_loadu_si512(xp + 32 * m);
#pragma GCC unroll 16
      for (int r = 0; r < RR; ++r) acc[r * MM + m] = dp(acc[r * MM + m], w[r], x);
    }
  }
  __m512 t[16];
#pragma GCC unroll 16
  for (int p = 0; p < 16; ++p) t[p] = acc[transposed4(p)];
  alignas(64) float out[16];
  _mm512_store_ps(out, reduce16(t));  // lane r * MM + m: output (m, v + r)
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) Y[m * V + v + r] = out[r * MM + m];
}

template <int MM>
void bx_minor_rows(const uint16_t* xp, int64_t M, const uint16_t* Wt, float* Y, int64_t D, int64_t V, int64_t v0,
                   int64_t v1) {
  constexpr int R = MM <= 4 ? 1 : 16 / MM;  // weight rows per tile: one sequential stream up to 4 rows of x
  int64_t v = v0;
  for (; v + R <= v1; v += R) bx_minor_tile<MM, R>(xp, M, Wt, Y, D, V, v);
  for (; v < v1; ++v) bx_minor_tile<MM, 1>(xp, M, Wt, Y, D, V, v);
}

constexpr int64_t kMinorGroup = 4;  // rows of x per tile: 4 rows x 4 weight rows (8 x 2 and 2 x 8 measured slower)

void bx_dense_minor(ffi::ThreadPool& pool, const uint16_t* X, const uint16_t* Wt, float* Y, int64_t M, int64_t D,
                    int64_t V, int64_t threads) {
  thread_local std::vector<uint16_t> xp;
  pack_minor(X, M, D, xp);
  const uint16_t* P = xp.data();
  const int64_t rows = chunk_rows(V, D * 2, threads, 16);
  const int64_t chunks = (V + rows - 1) / rows;
  parallel_chunks(pool, chunks, threads, [&](int64_t c) {
    const int64_t v0 = c * rows, v1 = std::min(V, (c + 1) * rows);
    for (int64_t t = v0; t < v1; t += 16)  // 16 weight rows (<= 20 KB at D 640) serve every row group from cache
      by_row_groups_of<kMinorGroup>(M, [&](int64_t m0, auto mm) {
        bx_minor_rows<decltype(mm)::value>(P + 32 * m0, M, Wt, Y + m0 * V, D, V, t, std::min(v1, t + 16));
      });
  });
}

// Major layout (w [D, V]): acc[m][c] += pairs of weight rows (d, d + 1) at 32 columns from v, for d in
// [d0, d1) (d1 - d0 even unless d1 == D: then the last row pairs with zeros), MM rows of x (packed pairs).
alignas(64) static const uint16_t kInterleave[2][32] = {
    {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
    {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};

constexpr int64_t kBlockD = 32;  // weight rows per pass: a pass's 32-column tile is 2 KB, read once per row group

template <int MM>
inline void bx_major_tile(const uint32_t* xp, int64_t M, const uint16_t* Wt, float* Y, int64_t D, int64_t V, int64_t v,
                          int64_t d0, int64_t d1, bool first) {
  const int64_t n = V - v;  // columns left (a tail tile when < 32)
  const __mmask32 k = tail_mask32(n);
  const __m512i lo_idx = _mm512_load_si512(kInterleave[0]), hi_idx = _mm512_load_si512(kInterleave[1]);
  __m512 acc[MM][2];
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m)
    for (int c = 0; c < 2; ++c)
      acc[m][c] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(tail_mask(n - 16 * c), Y + m * V + v + 16 * c);
  const uint16_t* w = Wt + d0 * V + v;
  const uint32_t* x = xp + (d0 / 2) * M;
  for (int64_t d = d0; d < d1; d += 2, w += 2 * V, x += M) {
    const __m512i a = _mm512_maskz_loadu_epi16(k, w);
    const __m512i b = d + 1 < d1 ? _mm512_maskz_loadu_epi16(k, w + V) : _mm512_setzero_si512();
    _mm_prefetch(reinterpret_cast<const char*>(w + kBlockD * V), _MM_HINT_T1);  // this tile in the next pass
    _mm_prefetch(reinterpret_cast<const char*>(w + (kBlockD + 1) * V), _MM_HINT_T1);
    const __m512i lo = _mm512_permutex2var_epi16(a, lo_idx, b), hi = _mm512_permutex2var_epi16(a, hi_idx, b);
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int32_t>(x[m]));
      acc[m][0] = dp(acc[m][0], lo, xb);
      acc[m][1] = dp(acc[m][1], hi, xb);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m)
    for (int c = 0; c < 2; ++c) _mm512_mask_storeu_ps(Y + m * V + v + 16 * c, tail_mask(n - 16 * c), acc[m][c]);
}

void bx_dense_major(ffi::ThreadPool& pool, const uint16_t* X, const uint16_t* Wt, float* Y, int64_t M, int64_t D,
                    int64_t V, int64_t threads) {
  if (D == 0) {
    std::fill(Y, Y + M * V, 0.0f);
    return;
  }
  thread_local std::vector<uint32_t> xp;
  pack_major(X, M, D, xp);
  const uint32_t* P = xp.data();
  const int64_t tiles = (V + 31) / 32;
  const int64_t per = std::max<int64_t>(1, (tiles + threads - 1) / threads);  // contiguous columns per chunk
  const int64_t chunks = (tiles + per - 1) / per;
  parallel_chunks(pool, chunks, threads, [&](int64_t c) {
    const int64_t t0 = c * per, t1 = std::min(tiles, (c + 1) * per);
    for (int64_t d0 = 0; d0 < D; d0 += kBlockD) {
      const int64_t d1 = std::min(D, d0 + kBlockD);
      for (int64_t t = t0; t < t1; ++t)
        by_row_groups(M, [&](int64_t m0, auto mm) {
          bx_major_tile<decltype(mm)::value>(P + m0, M, Wt, Y + m0 * V, D, V, 32 * t, d0, d1, d0 == 0);
        });
    }
  });
}

ffi::Error MinorBX(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], D = x.dimensions()[1], V = w.dimensions()[0];
  if (w.dimensions()[1] != D) return ffi::Error::InvalidArgument("dense_minor: x [M, D] and w [V, D] disagree");
  bx_dense_minor(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), reinterpret_cast<const uint16_t*>(w.typed_data()),
                 y->typed_data(), M, D, V, threads_of(pool));
  return ffi::Error::Success();
}

ffi::Error MajorBX(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], D = x.dimensions()[1], V = w.dimensions()[1];
  if (w.dimensions()[0] != D) return ffi::Error::InvalidArgument("dense_major: x [M, D] and w [D, V] disagree");
  bx_dense_major(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), reinterpret_cast<const uint16_t*>(w.typed_data()),
                 y->typed_data(), M, D, V, threads_of(pool));
  return ffi::Error::Success();
}
#endif  // __AVX512BF16__

template <ffi::DataType T, typename W>
ffi::Error Minor(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], D = x.dimensions()[1], V = w.dimensions()[0];
  if (w.dimensions()[1] != D) return ffi::Error::InvalidArgument("dense_minor: x [M, D] and w [V, D] disagree");
  dense_minor(pool, x.typed_data(), reinterpret_cast<const W*>(w.typed_data()), y->typed_data(), M, D, V, threads_of(pool));
  return ffi::Error::Success();
}

template <ffi::DataType T, typename W>
ffi::Error Major(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], D = x.dimensions()[1], V = w.dimensions()[1];
  if (w.dimensions()[0] != D) return ffi::Error::InvalidArgument("dense_major: x [M, D] and w [D, V] disagree");
  dense_major(pool, x.typed_data(), reinterpret_cast<const W*>(w.typed_data()), y->typed_data(), M, D, V, threads_of(pool));
  return ffi::Error::Success();
}

}  // namespace

#define GEMMA_DENSE(symbol, fn, T, W)                                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, (fn<T, W>), ffi::Ffi::Bind()                             \
                                                        .Ctx<ffi::ThreadPool>()                  \
                                                        .Arg<ffi::Buffer<ffi::F32>>()            \
                                                        .Arg<ffi::Buffer<T>>()                   \
                                                        .Ret<ffi::Buffer<ffi::F32>>());

GEMMA_DENSE(gemma_dense_minor_f32, Minor, ffi::F32, float)
GEMMA_DENSE(gemma_dense_minor_bf16, Minor, ffi::BF16, uint16_t)
GEMMA_DENSE(gemma_dense_major_f32, Major, ffi::F32, float)
GEMMA_DENSE(gemma_dense_major_bf16, Major, ffi::BF16, uint16_t)

#ifdef __AVX512BF16__
#define GEMMA_DENSE_BX(symbol, fn)                                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn, ffi::Ffi::Bind()                                     \
                                                .Ctx<ffi::ThreadPool>()                          \
                                                .Arg<ffi::Buffer<ffi::BF16>>()                   \
                                                .Arg<ffi::Buffer<ffi::BF16>>()                   \
                                                .Ret<ffi::Buffer<ffi::F32>>());
GEMMA_DENSE_BX(gemma_dense_minor_bf16x, MinorBX)
GEMMA_DENSE_BX(gemma_dense_major_bf16x, MajorBX)
#endif
