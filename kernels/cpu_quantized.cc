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
// One source, three builds: -DGEMMA_AVX512 (16 lanes, 32 registers), AVX2 + FMA (8 lanes, 16 registers),
// and -DGEMMA_AVX512 -DGEMMA_VNNI, which quantizes x to int8 instead of widening the weights (below, "The
// VNNI build"); kernels/cpu_quantized.py picks the build at run time. Each output is summed by one thread
// in one fixed order, the same for every row count: bitwise reproducible run to run, and a row's result
// does not depend on the rows that share its pass.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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
#if defined(GEMMA_VNNI)
#define GEMMA_ISA(name) name##_avx512vnni
#else
#define GEMMA_ISA(name) name##_avx512
#endif
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

// Weight rows held per tile for MM rows of x. Up to 4 rows: one, so that each thread reads one sequential
// stream, which the hardware prefetcher follows (the short interleaved streams of several 640-byte rows it
// follows poorly). Above, the products are compute-bound: as many rows as keep RR * MM accumulators plus RR
// weight vectors in the registers, each x vector loaded once for them.
template <int MM>
constexpr int tile_rows() {
  return MM <= 4 ? 1 : std::max(1, std::min(4, (kRegs - 4) / (2 * MM + 1)));
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


#if defined(GEMMA_VNNI)
// The VNNI build: x quantized per block of 32 values to int8 (llama.cpp's Q8_0 activations: d = max|x| / 127,
// q = round(x / d), nearest even), products of integers on vpdpbusd (64 byte pairs into 16 int32 lanes),
// each lane's sum scaled by its weight group's scale and its x block's d in f32. vpdpbusd multiplies
// unsigned by signed bytes: int4 values are 0..15 already; int8 weights go in as w + 128 (w ^ 0x80), and the
// 128 * sum(x) this adds is taken off per weight group (as int4's minimum is): y = sum_lanes(acc) - sum_g c_g X_g
// with c = the scale (int8) or the minimum (int4) and X_g = sum over the group of d * q (times 128 for int8).
// A chunk is 64 values (two groups of 32, four of 16). int4 chunks hold the nibbles of two groups: bytes
// 0-15 group a's values 0-15, 16-31 group b's 0-15, 32-47 a's 16-31, 48-63 b's 16-31; x is stored in the
// same order, so lanes 0-3 and 8-11 belong to group a, 4-7 and 12-15 to b.
constexpr int64_t kChunk = 64;

// Per row of x: q [K] int8 (chunk order), d [K / 4] (each chunk's 16 lane scales), X [K / G].
struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> d, X;
};

// Quantizes the M rows of x [M, K] into `out` (reused between calls on a thread: no allocation per call).
void quantize_x(const float* x, int64_t M, int64_t K, int64_t G, bool int4, QuantizedX& out) {
  out.q.resize(M * K);
  out.d.resize(M * K / 4);
  out.X.assign(M * (K / G), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int8_t* qm = out.q.data() + m * K;
    float* dm = out.d.data() + m * K / 4;
    float* Xm = out.X.data() + m * (K / G);
    for (int64_t b = 0; b < K / 32; ++b) {
      const __m512 x0 = _mm512_loadu_ps(xm + b * 32), x1 = _mm512_loadu_ps(xm + b * 32 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
      const __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id))));
      const __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id))));
      // int8: a chunk is blocks 2c, 2c + 1 in order; int4: block a = b % 2 of chunk c keeps its values 0-15 at
      // bytes 16a.. and 16-31 at 32 + 16a.. (the nibble order), lanes 4a..4a+3 and 8 + 4a..
      const int64_t c = b / 2, a = b % 2;
      int8_t* dst = qm + c * kChunk + (int4 ? 16 * a : 32 * a);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), q0);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (int4 ? 32 : 16)), q1);
      for (int l = 0; l < 4; ++l) {
        dm[c * 16 + (int4 ? 4 * a + l : 8 * a + l)] = d;
        dm[c * 16 + (int4 ? 8 + 4 * a + l : 8 * a + 4 + l)] = d;
      }
      alignas(16) int8_t q[32];
      _mm_store_si128(reinterpret_cast<__m128i*>(q), q0);
      _mm_store_si128(reinterpret_cast<__m128i*>(q + 16), q1);
      const int64_t step = std::min<int64_t>(G, 32);  // X_g: the sum of d_b * (q summed over b and g), b in order
      for (int64_t g0 = 0; g0 < 32; g0 += step) {
        int32_t sum = 0;
        for (int64_t k = g0; k < g0 + step; ++k) sum += q[k];
        Xm[(b * 32 + g0) / G] += d * static_cast<float>(int4 ? sum : 128 * sum);
      }
    }
  }
}

// The lane scales of a chunk from the weight's scales s (c's groups first): per group of 16, 32 or >= 64.
template <typename S>
inline Vec lane_scales(const S* s, int64_t c, int64_t G, __m512i idx) {
  if (G >= kChunk) return vset(scalar(s + c * kChunk / G));
  const __mmask8 n = static_cast<__mmask8>((1u << (kChunk / G)) - 1);
  __m128 v;
  if constexpr (sizeof(S) == 4)
    v = _mm_maskz_loadu_ps(n, reinterpret_cast<const float*>(s) + c * (kChunk / G));
  else
    v = _mm_cvtph_ps(_mm_maskz_loadu_epi16(n, reinterpret_cast<const uint16_t*>(s) + c * (kChunk / G)));
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}

inline __m512i lane_index(int64_t G, bool int4) {
  alignas(64) int32_t i[16];
  for (int l = 0; l < 16; ++l) i[l] = G >= kChunk ? 0 : int4 ? (l / 4) % 2 : l * 4 / G;
  return _mm512_load_si512(i);
}

template <int MM>
constexpr int vnni_tile_rows() {  // as tile_rows: one weight row up to 4 rows of x
  return MM <= 4 ? 1 : std::max(1, std::min(4, (kRegs - 4) / (MM + 2)));
}

// y[m, v + r] for r < RR, MM rows of quantized x: weights q (int8 [R, K] or int4 [R, K / 2]), scales c_s
// [R, K / G], int4 minimums c_m (the correction's c for int4; the scales for int8).
template <int RR, int MM, bool INT4, typename S>
inline void vnni_tile(const QuantizedX& qx, int64_t m0, const uint8_t* Q, const S* Sc, const S* Mn, float* Y,
                      int64_t K, int64_t G, int64_t R, int64_t v, __m512i idx) {
  const int64_t row_bytes = INT4 ? K / 2 : K, groups = K / G;
  const int8_t* X = qx.q.data() + m0 * K;
  const float* D = qx.d.data() + m0 * K / 4;
  Vec acc[RR][MM];
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) acc[r][m] = vzero();
  for (int64_t c = 0; c < K / kChunk; ++c) {
    __m512i w[RR];
    Vec s[RR];
    for (int r = 0; r < RR; ++r) {
      const uint8_t* p = Q + (v + r) * row_bytes + c * (INT4 ? 32 : 64);
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
      if constexpr (INT4) {
        __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        b = _mm512_mask_srli_epi16(b, 0xFFFF0000u, b, 4);  // the upper half: high nibbles
        w[r] = _mm512_and_si512(b, _mm512_set1_epi8(15));
      } else {
        w[r] = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(static_cast<char>(0x80)));
      }
      s[r] = lane_scales(Sc + (v + r) * groups, c, G, idx);
    }
    for (int m = 0; m < MM; ++m) {
      const __m512i x = _mm512_loadu_si512(X + m * K + c * kChunk);
      const Vec d = vload(D + m * K / 4 + c * 16);
      for (int r = 0; r < RR; ++r) {
        const Vec t = vmul(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], x)), d);
        acc[r][m] = vfma(t, s[r], acc[r][m]);
      }
    }
  }
  const float* Xg = qx.X.data() + m0 * groups;  // the corrections, 16 groups at a time
  const S* C = INT4 ? Mn : Sc;
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 n = static_cast<__mmask16>(groups - g >= 16 ? 0xFFFF : (1u << (groups - g)) - 1);
    for (int r = 0; r < RR; ++r) {
      Vec cr;
      if constexpr (sizeof(S) == 4)
        cr = _mm512_maskz_loadu_ps(n, reinterpret_cast<const float*>(C) + (v + r) * groups + g);
      else
        cr = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(n, reinterpret_cast<const uint16_t*>(C) + (v + r) * groups + g));
      for (int m = 0; m < MM; ++m)
        acc[r][m] = _mm512_fnmadd_ps(cr, _mm512_maskz_loadu_ps(n, Xg + m * groups + g), acc[r][m]);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) Y[m * R + v + r] = vsum(acc[r][m]);
}

template <bool INT4, typename S>
void vnni(ffi::ThreadPool& pool, const float* x, const uint8_t* Q, const S* Sc, const S* Mn, float* Y, int64_t M,
          int64_t K, int64_t G, int64_t R) {
  QuantizedX qx;
  quantize_x(x, M, K, G, INT4, qx);
  const __m512i idx = lane_index(G, INT4);
  split(pool, M, R, INT4 ? K / 2 : K, [&](int64_t m0, auto mm, int64_t v0, int64_t v1) {
    constexpr int MM = decltype(mm)::value;
    constexpr int RR = vnni_tile_rows<MM>();
    int64_t v = v0;
    for (; v + RR <= v1; v += RR) vnni_tile<RR, MM, INT4>(qx, m0, Q, Sc, Mn, Y + m0 * R, K, G, R, v, idx);
    for (; v < v1; ++v) vnni_tile<1, MM, INT4>(qx, m0, Q, Sc, Mn, Y + m0 * R, K, G, R, v, idx);
  });
}

inline bool vnni_serves(int64_t K, int64_t G) { return K % kChunk == 0 && (G == 16 || G == 32 || G % kChunk == 0); }
#endif

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
#if defined(GEMMA_VNNI)
  if (!vnni_serves(K, G))
    return ffi::Error::InvalidArgument("gemma_q8 (VNNI): expected K % 64 == 0 and groups of 16, 32 or a multiple of 64");
  vnni<false>(pool, X, reinterpret_cast<const uint8_t*>(Q), Sc, Sc, Y, M, K, G, R);
  return ffi::Error::Success();
#endif
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
#if defined(GEMMA_VNNI)
  if (!vnni_serves(K, 32)) return ffi::Error::InvalidArgument("gemma_q4 (VNNI): expected K % 64 == 0");
  vnni<true>(pool, X, Q, Sc, Mn, Y, M, K, 32, R);
  return ffi::Error::Success();
#endif
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
