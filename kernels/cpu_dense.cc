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

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

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
  constexpr int R = MM <= 2 ? 1 : MM <= 4 ? 3 : 2;
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
