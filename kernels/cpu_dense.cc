// Matrix-vector products with bfloat16 weights on x86 CPUs, for decode-sized inputs.
//
// XLA:CPU runs bf16 dots an order of magnitude slower than f32 ones; these two
// kernels stream the bf16 weights once, widen each 16-lane vector to f32
// exactly (a 16-bit shift) and accumulate in f32, so a decode step reads half
// the bytes of an f32 model. x and y are f32.
//
//   gemma_dense_minor:  y[m, v] = sum_d x[m, d] * w[v, d]   (w [V, D], the tied embedding)
//   gemma_dense_major:  y[m, v] = sum_d x[m, d] * w[d, v]   (w [D, V], projections and MLP)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __m512 widen(const uint16_t* p) {  // 16 bf16 -> 16 f32, exact
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

inline __m512 widen_masked(const uint16_t* p, int64_t n) {
  __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

ffi::Error DenseMinor(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], D = x.dimensions()[1], V = w.dimensions()[0];
  if (w.dimensions()[1] != D) return ffi::Error::InvalidArgument("dense_minor: x [M, D] and w [V, D] disagree");
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.typed_data());
  const float* X = x.typed_data();
  float* Y = y->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t v = 0; v < V; ++v) {
    const uint16_t* row = W + v * D;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = X + m * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t d = 0;
      for (; d + 32 <= D; d += 32) {
        a0 = _mm512_fmadd_ps(widen(row + d), _mm512_loadu_ps(xm + d), a0);
        a1 = _mm512_fmadd_ps(widen(row + d + 16), _mm512_loadu_ps(xm + d + 16), a1);
      }
      for (; d < D; d += 16) {
        __mmask16 k = tail_mask(D - d);
        a0 = _mm512_fmadd_ps(widen_masked(row + d, D - d), _mm512_maskz_loadu_ps(k, xm + d), a0);
      }
      Y[m * V + v] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  }
  return ffi::Error::Success();
}

ffi::Error DenseMajor(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], D = x.dimensions()[1], V = w.dimensions()[1];
  if (w.dimensions()[0] != D) return ffi::Error::InvalidArgument("dense_major: x [M, D] and w [D, V] disagree");
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.typed_data());
  const float* X = x.typed_data();
  float* Y = y->typed_data();
  constexpr int64_t kBand = 1024;  // columns per task: y[M, band] stays in L1/L2 while w streams row by row
  const int64_t bands = (V + kBand - 1) / kBand;
#pragma omp parallel for schedule(static)
  for (int64_t band = 0; band < bands; ++band) {
    const int64_t v0 = band * kBand, width = std::min(kBand, V - v0);
    for (int64_t m = 0; m < M; ++m) std::fill(Y + m * V + v0, Y + m * V + v0 + width, 0.0f);
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {  // four rows per pass: one load/store of y per four weight vectors
      const uint16_t* r = W + d * V + v0;
      for (int64_t v = 0; v < width; v += 16) {
        const int64_t n = width - v;
        const __mmask16 k = tail_mask(n);
        __m512 w0 = widen_masked(r + v, n), w1 = widen_masked(r + V + v, n);
        __m512 w2 = widen_masked(r + 2 * V + v, n), w3 = widen_masked(r + 3 * V + v, n);
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = X + m * D + d;
          float* ym = Y + m * V + v0 + v;
          __m512 acc = _mm512_maskz_loadu_ps(k, ym);
          acc = _mm512_fmadd_ps(w0, _mm512_set1_ps(xm[0]), acc);
          acc = _mm512_fmadd_ps(w1, _mm512_set1_ps(xm[1]), acc);
          acc = _mm512_fmadd_ps(w2, _mm512_set1_ps(xm[2]), acc);
          acc = _mm512_fmadd_ps(w3, _mm512_set1_ps(xm[3]), acc);
          _mm512_mask_storeu_ps(ym, k, acc);
        }
      }
    }
    for (; d < D; ++d) {
      const uint16_t* r = W + d * V + v0;
      for (int64_t v = 0; v < width; v += 16) {
        const int64_t n = width - v;
        const __mmask16 k = tail_mask(n);
        __m512 w0 = widen_masked(r + v, n);
        for (int64_t m = 0; m < M; ++m) {
          float* ym = Y + m * V + v0 + v;
          _mm512_mask_storeu_ps(ym, k, _mm512_fmadd_ps(w0, _mm512_set1_ps(X[m * D + d]), _mm512_maskz_loadu_ps(k, ym)));
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_dense_minor, DenseMinor,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_dense_major, DenseMajor,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
