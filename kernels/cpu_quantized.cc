// Decode-sized products with quantized weights on x86 CPUs: y[m, r] = sum_k x[m, k] * w[r, k].
//
// w is stored rows x contraction in groups (kernels/quantized.py):
//   gemma_q8_{f16,f32}:  w[r, k] = s[r, k / G] * q[r, k]           q int8, groups of G values
//   gemma_q4_{f16,f32}:  w[r, k] = s[r, k / 32] * q[r, k] - m[r, k / 32]
//                        q 0..15, a group's 32 values in 16 bytes: byte j = value j | value j + 16 << 4
// with scales s, m in float16 or float32. The weights are read once per call and widened in
// registers to exactly the float32 values `quantized.dequantize` gives (s * q is exact in float32
// for every format we hold, so s * q - m is rounded once either way), then multiplied into f32
// accumulators against every row of x held in registers. x and y are f32.
//
// One source, two instruction sets: built with -DGEMMA_AVX512 (16 lanes, 32 registers) or for
// AVX2 + FMA (8 lanes, 16 registers); kernels/cpu_quantized.py picks the build at run time. Each
// output is summed by one thread in one fixed order: bitwise reproducible run to run.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "cpu_parallel.h"

namespace ffi = xla::ffi;

namespace {

#if defined(GEMMA_AVX512)
using Vec = __m512;
constexpr int kLanes = 16, kRegs = 32;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float s) { return _mm512_set1_ps(s); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vfmsub(Vec a, Vec b, Vec c) { return _mm512_fmsub_ps(a, b, c); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
// kLanes int8 -> float32
inline Vec widen_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// kLanes bytes of nibble pairs -> their low nibbles (lo) and high nibbles (hi) as float32
inline void widen_u4(const uint8_t* p, Vec& lo, Vec& hi) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#define GEMMA_ISA(name) name##_avx512
#else
using Vec = __m256;
constexpr int kLanes = 8, kRegs = 16;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float s) { return _mm256_set1_ps(s); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vfmsub(Vec a, Vec b, Vec c) { return _mm256_fmsub_ps(a, b, c); }
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline Vec widen_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void widen_u4(const uint8_t* p, Vec& lo, Vec& hi) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#define GEMMA_ISA(name) name##_avx2
#endif

constexpr int64_t kPrefetch = 2048;  // bytes ahead of each weight row's stream

inline float scalar(const float* p) { return *p; }
inline float scalar(const uint16_t* p) { return _cvtsh_ss(*p); }

// Weight rows held per tile for MM rows of x: accumulators RR * MM plus RR weight vectors fit the registers.
template <int MM>
constexpr int tile_rows() {
  return std::max(1, std::min(4, (kRegs - 4) / (2 * MM + 1)));
}

// y[m, v + r] for r < RR, MM rows of x: int8 weights in groups of G.
template <int RR, int MM, typename S>
inline void q8_tile(const float* X, const int8_t* Q, const S* Sc, float* Y, int64_t K, int64_t G, int64_t R,
                    int64_t v) {
  const int64_t groups = K / G;
  Vec acc[RR][MM];
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) acc[r][m] = vzero();
  for (int64_t g = 0; g < groups; ++g) {
    Vec s[RR];
    for (int r = 0; r < RR; ++r) {
      s[r] = vset(scalar(Sc + (v + r) * groups + g));
      _mm_prefetch(reinterpret_cast<const char*>(Q + (v + r) * K + g * G) + kPrefetch, _MM_HINT_T0);
    }
    for (int64_t k = g * G; k < (g + 1) * G; k += kLanes) {
      Vec w[RR];
      for (int r = 0; r < RR; ++r) w[r] = vmul(s[r], widen_i8(Q + (v + r) * K + k));
      for (int m = 0; m < MM; ++m) {
        Vec x = vload(X + m * K + k);
        for (int r = 0; r < RR; ++r) acc[r][m] = vfma(w[r], x, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) Y[m * R + v + r] = vsum(acc[r][m]);
}

// y[m, v + r] for r < RR, MM rows of x: int4 weights, asymmetric groups of 32 (16 bytes each).
template <int RR, int MM, typename S>
inline void q4_tile(const float* X, const uint8_t* Q, const S* Sc, const S* Mn, float* Y, int64_t K, int64_t R,
                    int64_t v) {
  const int64_t groups = K / 32, row_bytes = K / 2;
  Vec acc[RR][MM];
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) acc[r][m] = vzero();
  for (int64_t g = 0; g < groups; ++g) {
    Vec s[RR], mn[RR];
    for (int r = 0; r < RR; ++r) {
      s[r] = vset(scalar(Sc + (v + r) * groups + g));
      mn[r] = vset(scalar(Mn + (v + r) * groups + g));
      _mm_prefetch(reinterpret_cast<const char*>(Q + (v + r) * row_bytes + g * 16) + kPrefetch, _MM_HINT_T0);
    }
    for (int h = 0; h < 16; h += kLanes) {  // values g*32 + h + [0, kLanes) (low nibbles) and + 16 (high)
      Vec lo[RR], hi[RR];
      for (int r = 0; r < RR; ++r) {
        widen_u4(Q + (v + r) * row_bytes + g * 16 + h, lo[r], hi[r]);
        lo[r] = vfmsub(s[r], lo[r], mn[r]);
        hi[r] = vfmsub(s[r], hi[r], mn[r]);
      }
      for (int m = 0; m < MM; ++m) {
        const float* x = X + m * K + g * 32 + h;
        Vec xlo = vload(x), xhi = vload(x + 16);
        for (int r = 0; r < RR; ++r) acc[r][m] = vfma(hi[r], xhi, vfma(lo[r], xlo, acc[r][m]));
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) Y[m * R + v + r] = vsum(acc[r][m]);
}

// Weight rows [v0, v1) against MM rows of x: tiles of RR rows, then single rows.
template <int MM, typename Tile>
inline void rows(int64_t v0, int64_t v1, Tile tile) {
  constexpr int RR = tile_rows<MM>();
  int64_t v = v0;
  for (; v + RR <= v1; v += RR) tile(v, std::integral_constant<int, RR>{});
  for (; v < v1; ++v) tile(v, std::integral_constant<int, 1>{});
}

// Splits the R weight rows into chunks over the threads; f(m0, mm, v0, v1) for each row group of x.
template <typename F>
void split(ffi::ThreadPool& pool, int64_t M, int64_t R, int64_t row_bytes, F f) {
  const int64_t threads = threads_of(pool);
  const int64_t rows_per = chunk_rows(R, row_bytes, threads, 4);
  const int64_t chunks = (R + rows_per - 1) / rows_per;
  parallel_chunks(pool, chunks, threads, [&](int64_t c) {
    const int64_t v0 = c * rows_per, v1 = std::min(R, (c + 1) * rows_per);
    by_row_groups(M, [&](int64_t m0, auto mm) { f(m0, mm, v0, v1); });
  });
}

template <ffi::DataType T, typename S>
ffi::Error Q8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<T> scale,
              ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], R = q.dimensions()[0];
  if (q.dimensions()[1] != K || scale.dimensions()[0] != R || scale.dimensions()[1] == 0 ||
      K % scale.dimensions()[1] || (K / scale.dimensions()[1]) % kLanes)
    return ffi::Error::InvalidArgument("gemma_q8: expected x [M, K], q [R, K], scale [R, K / G], G % 16 == 0");
  const int64_t G = K / scale.dimensions()[1];
  const float* X = x.typed_data();
  const int8_t* Q = q.typed_data();
  const S* Sc = reinterpret_cast<const S*>(scale.typed_data());
  float* Y = y->typed_data();
  split(pool, M, R, K, [&](int64_t m0, auto mm, int64_t v0, int64_t v1) {
    constexpr int MM = decltype(mm)::value;
    rows<MM>(v0, v1, [&](int64_t v, auto rr) {
      q8_tile<decltype(rr)::value, MM>(X + m0 * K, Q, Sc, Y + m0 * R, K, G, R, v);
    });
  });
  return ffi::Error::Success();
}

template <ffi::DataType T, typename S>
ffi::Error Q4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q, ffi::Buffer<T> scale,
              ffi::Buffer<T> minimum, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], R = q.dimensions()[0];
  if (K % 32 || q.dimensions()[1] * 2 != K || scale.dimensions()[0] != R || scale.dimensions()[1] * 32 != K ||
      minimum.dimensions()[0] != R || minimum.dimensions()[1] * 32 != K)
    return ffi::Error::InvalidArgument("gemma_q4: expected x [M, K], q [R, K / 2], scale and minimum [R, K / 32]");
  const float* X = x.typed_data();
  const uint8_t* Q = q.typed_data();
  const S* Sc = reinterpret_cast<const S*>(scale.typed_data());
  const S* Mn = reinterpret_cast<const S*>(minimum.typed_data());
  float* Y = y->typed_data();
  split(pool, M, R, K / 2, [&](int64_t m0, auto mm, int64_t v0, int64_t v1) {
    constexpr int MM = decltype(mm)::value;
    rows<MM>(v0, v1, [&](int64_t v, auto rr) {
      q4_tile<decltype(rr)::value, MM>(X + m0 * K, Q, Sc, Mn, Y + m0 * R, K, R, v);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

#define GEMMA_Q8(symbol, T, S)                                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(GEMMA_ISA(symbol), (Q8<T, S>), ffi::Ffi::Bind()                    \
                                                                   .Ctx<ffi::ThreadPool>()         \
                                                                   .Arg<ffi::Buffer<ffi::F32>>()   \
                                                                   .Arg<ffi::Buffer<ffi::S8>>()    \
                                                                   .Arg<ffi::Buffer<T>>()          \
                                                                   .Ret<ffi::Buffer<ffi::F32>>());
#define GEMMA_Q4(symbol, T, S)                                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(GEMMA_ISA(symbol), (Q4<T, S>), ffi::Ffi::Bind()                    \
                                                                   .Ctx<ffi::ThreadPool>()         \
                                                                   .Arg<ffi::Buffer<ffi::F32>>()   \
                                                                   .Arg<ffi::Buffer<ffi::U8>>()    \
                                                                   .Arg<ffi::Buffer<T>>()          \
                                                                   .Arg<ffi::Buffer<T>>()          \
                                                                   .Ret<ffi::Buffer<ffi::F32>>());

GEMMA_Q8(gemma_q8_f16, ffi::F16, uint16_t)
GEMMA_Q8(gemma_q8_f32, ffi::F32, float)
GEMMA_Q4(gemma_q4_f16, ffi::F16, uint16_t)
GEMMA_Q4(gemma_q4_f32, ffi::F32, float)
