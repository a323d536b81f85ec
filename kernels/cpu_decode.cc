// Decode-step pieces of the KV cache on x86 CPUs (AVX-512), through XLA FFI custom calls.
//
//   gemma_cache_write:  dst[b, slots[b, t]] = src[b, t] for slots in [0, S), in place (the output
//                       aliases dst; src may cover only dst's first rows). Any element type: rows are copied as bytes. XLA:CPU widens a bf16
//                       scatter to f32, converting the whole cache there and back on every write.
//   gemma_decode_attention_{f32,bf16}: one query position per row over the cache's keys and values
//                       [B, S, K, H] (f32 or bf16), keys s visible iff lo[b] <= k_pos[b, s] <= hi[b]
//                       (B query rows over the first B rows of a cache that may hold more);
//                       scores, softmax and the weighted sum of values in f32. XLA:CPU's two einsums
//                       transpose the values to [B, H, S] every step (a copy of the cache per layer).
//   gemma_put_rows, gemma_copy_rows, gemma_take_rows: whole rows (axis 0) copied into or out of an array as bytes
//                       (the engine's slots), in place where the output aliases the input.
//   gemma_argmax_rows:  the index of each row's largest value among its first `limit` (jnp.argmax: the first
//                       of equal maxima, the first NaN if any). XLA:CPU's argmax is a variadic reduce at
//                       ~1 GB/s: 18 ms of the 16-row step over the 262144-token vocabulary.
//
// Every output is computed by one thread in one fixed order: results do not depend on the thread
// count, on which thread ran what, or on the other rows of the batch.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_parallel.h"

namespace ffi = xla::ffi;

namespace {

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512 load16(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
inline __m512 load16(const uint16_t* p, int64_t n) {
  __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x for x <= 0 (scores minus their maximum), 16 lanes: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2],
// p the degree-6 Taylor polynomial (relative error < 3e-8 there); below -87 the result is 0.
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  __m512 y = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(~tiny, y);
}

// The cache write. dst [B, S, ...], src [B, T, ...], slots [B, T]: slots outside [0, S) are dropped.
ffi::Error Write(ffi::AnyBuffer dst, ffi::AnyBuffer src, ffi::Buffer<ffi::S32> slots, ffi::Result<ffi::AnyBuffer> out) {
  auto dd = dst.dimensions(), sd = src.dimensions();
  if (dd.size() < 2 || sd.size() != dd.size() || sd[0] > dd[0] || dst.element_type() != src.element_type() ||
      slots.dimensions().size() != 2 || slots.dimensions()[0] != sd[0] || slots.dimensions()[1] != sd[1])
    return ffi::Error::InvalidArgument("gemma_cache_write: expected dst [B, S, ...], src [b <= B, T, ...], slots [b, T]");
  for (size_t i = 2; i < dd.size(); ++i)
    if (dd[i] != sd[i]) return ffi::Error::InvalidArgument("gemma_cache_write: dst and src rows disagree");
  const int64_t B = sd[0], S = dd[1], T = sd[1];  // the first B rows of dst
  const int64_t row = dd[0] * S ? static_cast<int64_t>(dst.size_bytes()) / (dd[0] * S) : 0;
  char* o = static_cast<char*>(out->untyped_data());
  if (o != dst.untyped_data()) std::memcpy(o, dst.untyped_data(), dst.size_bytes());  // not aliased: copy first
  const char* s = static_cast<const char*>(src.untyped_data());
  const int32_t* slot = slots.typed_data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t j = slot[b * T + t];
      if (j >= 0 && j < S) std::memcpy(o + (b * S + j) * row, s + (b * T + t) * row, row);
    }
  return ffi::Error::Success();
}

// dst [S, ...] with rows [start, start + n) replaced by src [n, ...] (start clamped to [0, S - n]), in place.
ffi::Error PutRows(ffi::AnyBuffer dst, ffi::AnyBuffer src, ffi::Buffer<ffi::S32> start, ffi::Result<ffi::AnyBuffer> out) {
  auto dd = dst.dimensions(), sd = src.dimensions();
  if (dd.size() < 1 || sd.size() != dd.size() || sd[0] > dd[0] || dst.element_type() != src.element_type() ||
      !std::equal(dd.begin() + 1, dd.end(), sd.begin() + 1))
    return ffi::Error::InvalidArgument("gemma_put_rows: expected dst [S, ...] and src [n <= S, ...] of one dtype");
  const int64_t S = dd[0], n = sd[0];
  const int64_t row = S ? static_cast<int64_t>(dst.size_bytes()) / S : 0;
  char* o = static_cast<char*>(out->untyped_data());
  if (o != dst.untyped_data()) std::memcpy(o, dst.untyped_data(), dst.size_bytes());
  const int64_t at = std::clamp<int64_t>(start.typed_data()[0], 0, S - n);
  std::memcpy(o + at * row, src.untyped_data(), n * row);
  return ffi::Error::Success();
}

// dst [S, ...] with dst[to[k]] = src[from[k]] for every k with to[k] in [0, S) and from[k] in [0, n), in place.
ffi::Error CopyRows(ffi::AnyBuffer dst, ffi::AnyBuffer src, ffi::Buffer<ffi::S32> from, ffi::Buffer<ffi::S32> to,
                    ffi::Result<ffi::AnyBuffer> out) {
  auto dd = dst.dimensions(), sd = src.dimensions();
  if (dd.size() < 1 || sd.size() != dd.size() || dst.element_type() != src.element_type() ||
      !std::equal(dd.begin() + 1, dd.end(), sd.begin() + 1) || from.element_count() != to.element_count())
    return ffi::Error::InvalidArgument("gemma_copy_rows: expected dst [S, ...] and src [n, ...] of one dtype and "
                                       "as many source as destination rows");
  const int64_t S = dd[0], n = sd[0];
  const int64_t row = S ? static_cast<int64_t>(dst.size_bytes()) / S : 0;
  char* o = static_cast<char*>(out->untyped_data());
  if (o != dst.untyped_data()) std::memcpy(o, dst.untyped_data(), dst.size_bytes());
  const char* s = static_cast<const char*>(src.untyped_data());
  for (size_t k = 0; k < from.element_count(); ++k) {
    const int64_t i = from.typed_data()[k], j = to.typed_data()[k];
    if (i >= 0 && i < n && j >= 0 && j < S) std::memcpy(o + j * row, s + i * row, row);
  }
  return ffi::Error::Success();
}

// out [n, ...] = src[0:n] (n from the output's shape): a plain copy (XLA:CPU slices bf16 through f32).
ffi::Error TakeRows(ffi::AnyBuffer src, ffi::Result<ffi::AnyBuffer> out) {
  if (out->size_bytes() > src.size_bytes() || out->element_type() != src.element_type())
    return ffi::Error::InvalidArgument("gemma_take_rows: the output must be a leading slice of the input");
  std::memcpy(out->untyped_data(), src.untyped_data(), out->size_bytes());
  return ffi::Error::Success();
}

constexpr int kG = 4;   // query heads of a group scored against each key together
constexpr int kHV = 4;  // 16-lane vectors of the head dimension per pass over the values

// One (row, kv head): G queries q [G, H] against the S keys and values at stride ld (= K * H).
template <typename KV>
void attend(const float* q, const KV* k, const KV* v, const int32_t* pos, int32_t lo, int32_t hi, int64_t S,
            int64_t H, int64_t ld, int64_t G, float scale, float softcap, float* out, std::vector<float>& p) {
  p.assign(G * S, 0.0f);
  std::vector<float> top(G, -std::numeric_limits<float>::infinity());
  bool any = false;
  for (int64_t g0 = 0; g0 < G; g0 += kG) {
    const int64_t gn = std::min<int64_t>(kG, G - g0);
    for (int64_t s = 0; s < S; ++s) {
      if (pos[s] < lo || pos[s] > hi) continue;
      any = true;
      const KV* ks = k + s * ld;
      __m512 acc[kG];
      for (int g = 0; g < kG; ++g) acc[g] = _mm512_setzero_ps();
      for (int64_t h = 0; h < H; h += 16) {
        __m512 kv = load16(ks + h, H - h);
        for (int g = 0; g < kG; ++g)
          if (g < gn) acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask(H - h), q + (g0 + g) * H + h), kv, acc[g]);
      }
      for (int g = 0; g < gn; ++g) {
        float x = _mm512_reduce_add_ps(acc[g]) * scale;
        if (softcap > 0) x = std::tanh(x / softcap) * softcap;
        p[(g0 + g) * S + s] = x;
        top[g0 + g] = std::max(top[g0 + g], x);
      }
    }
  }
  if (!any) {
    std::fill(out, out + G * H, 0.0f);
    return;
  }
  std::vector<float> denom(G, 0.0f);
  for (int64_t g = 0; g < G; ++g) {  // p = exp(score - max) on visible keys, 0 elsewhere
    float* pg = p.data() + g * S;
    const __m512 m = _mm512_set1_ps(top[g]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {
      __m512i ps = _mm512_maskz_loadu_epi32(tail_mask(S - s), pos + s);
      __mmask16 seen = _mm512_cmpge_epi32_mask(ps, _mm512_set1_epi32(lo)) &
                       _mm512_cmple_epi32_mask(ps, _mm512_set1_epi32(hi)) & tail_mask(S - s);
      __m512 e = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(seen, pg + s), m)));
      _mm512_mask_storeu_ps(pg + s, tail_mask(S - s), e);
      sum = _mm512_add_ps(sum, e);
    }
    denom[g] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t h0 = 0; h0 < H; h0 += 16 * kHV) {
    for (int64_t g0 = 0; g0 < G; g0 += kG) {
      const int64_t gn = std::min<int64_t>(kG, G - g0);
      __m512 acc[kG][kHV];
      for (int g = 0; g < kG; ++g)
        for (int c = 0; c < kHV; ++c) acc[g][c] = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        if (pos[s] < lo || pos[s] > hi) continue;
        const KV* vs = v + s * ld + h0;
        __m512 vv[kHV];
        for (int c = 0; c < kHV; ++c) vv[c] = load16(vs + 16 * c, H - h0 - 16 * c);
        for (int g = 0; g < kG; ++g) {
          if (g >= gn) break;
          __m512 pb = _mm512_set1_ps(p[(g0 + g) * S + s]);
          for (int c = 0; c < kHV; ++c) acc[g][c] = _mm512_fmadd_ps(pb, vv[c], acc[g][c]);
        }
      }
      for (int g = 0; g < gn; ++g) {
        const __m512 inv = _mm512_set1_ps(denom[g0 + g] > 0 ? 1.0f / denom[g0 + g] : 0.0f);
        for (int c = 0; c < kHV; ++c) {
          const int64_t h = h0 + 16 * c;
          if (h < H) _mm512_mask_storeu_ps(out + (g0 + g) * H + h, tail_mask(H - h), _mm512_mul_ps(acc[g][c], inv));
        }
      }
    }
  }
}

template <ffi::DataType T, typename KV>
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<T> k, ffi::Buffer<T> v,
                     ffi::Buffer<ffi::S32> k_pos, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, float scale,
                     float softcap, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || kd[0] < qd[0] || kd[3] != qd[2] || qd[1] % kd[2] ||
      v.dimensions().size() != 4 || !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) || k_pos.dimensions()[1] != kd[1] ||
      lo.dimensions()[0] != qd[0] || hi.dimensions()[0] != qd[0] || k_pos.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument("gemma_decode_attention: expected q [B, N, H], k, v [b >= B, S, K, H], "
                                       "k_pos [B, S], lo, hi [B]");
  const int64_t B = qd[0], S = kd[1], K = kd[2], H = kd[3], N = qd[1], G = N / K;
  const float* Q = q.typed_data();
  const KV* Kp = reinterpret_cast<const KV*>(k.typed_data());
  const KV* Vp = reinterpret_cast<const KV*>(v.typed_data());
  const int32_t* P = k_pos.typed_data();
  float* O = out->typed_data();
  parallel_chunks(pool, B * K, threads_of(pool), [&](int64_t unit) {
    thread_local std::vector<float> p;
    const int64_t b = unit / K, kh = unit % K;
    attend(Q + (b * N + kh * G) * H, Kp + b * S * K * H + kh * H, Vp + b * S * K * H + kh * H, P + b * S,
           lo.typed_data()[b], hi.typed_data()[b], S, H, K * H, G, scale, softcap, O + (b * N + kh * G) * H, p);
  });
  return ffi::Error::Success();
}

// One row's argmax over n values (jnp.argmax's ties and NaNs): per lane the first maximum, then the
// smallest index among the lanes holding the largest value; a NaN anywhere wins at its first index.
int32_t argmax_row(const float* x, int64_t n) {
  if (n <= 0) return 0;
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i where = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    nan |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
    if (nan) break;
    // strictly greater (or the lane's first value): the first of equal maxima stays
    const __mmask16 take = (_mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmpeq_epi32_mask(where, _mm512_set1_epi32(-1))) & k;
    best = _mm512_mask_mov_ps(best, take, v);
    where = _mm512_mask_mov_epi32(where, take, idx);
    idx = _mm512_add_epi32(idx, step);
  }
  if (nan) {
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(x[j])) return static_cast<int32_t>(j);
  }
  alignas(64) float b[16];
  alignas(64) int32_t w[16];
  _mm512_store_ps(b, best);
  _mm512_store_si512(w, where);
  int32_t out = -1;
  float top = 0;
  for (int l = 0; l < 16; ++l) {
    if (w[l] < 0) continue;
    if (out < 0 || b[l] > top || (b[l] == top && w[l] < out)) top = b[l], out = w[l];
  }
  return out < 0 ? 0 : out;
}

ffi::Error Argmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, int64_t limit, ffi::ResultBuffer<ffi::S32> out) {
  if (x.dimensions().size() != 2) return ffi::Error::InvalidArgument("gemma_argmax_rows: expected x [B, V]");
  const int64_t B = x.dimensions()[0], V = x.dimensions()[1], n = std::min(V, limit);
  const float* X = x.typed_data();
  int32_t* O = out->typed_data();
  parallel_chunks(pool, B, threads_of(pool), [&](int64_t b) { O[b] = argmax_row(X + b * V, n); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_cache_write, Write, ffi::Ffi::Bind()
                                                            .Arg<ffi::AnyBuffer>()
                                                            .Arg<ffi::AnyBuffer>()
                                                            .Arg<ffi::Buffer<ffi::S32>>()
                                                            .Ret<ffi::AnyBuffer>());

#define GEMMA_DECODE_ATTENTION(symbol, T, KV)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, (Attention<T, KV>), ffi::Ffi::Bind()                     \
                                                                .Ctx<ffi::ThreadPool>()          \
                                                                .Arg<ffi::Buffer<ffi::F32>>()    \
                                                                .Arg<ffi::Buffer<T>>()           \
                                                                .Arg<ffi::Buffer<T>>()           \
                                                                .Arg<ffi::Buffer<ffi::S32>>()    \
                                                                .Arg<ffi::Buffer<ffi::S32>>()    \
                                                                .Arg<ffi::Buffer<ffi::S32>>()    \
                                                                .Attr<float>("scale")            \
                                                                .Attr<float>("softcap")          \
                                                                .Ret<ffi::Buffer<ffi::F32>>());

GEMMA_DECODE_ATTENTION(gemma_decode_attention_f32, ffi::F32, float)
GEMMA_DECODE_ATTENTION(gemma_decode_attention_bf16, ffi::BF16, uint16_t)

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_argmax_rows, Argmax, ffi::Ffi::Bind()
                                                             .Ctx<ffi::ThreadPool>()
                                                             .Arg<ffi::Buffer<ffi::F32>>()
                                                             .Attr<int64_t>("limit")
                                                             .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_put_rows, PutRows, ffi::Ffi::Bind()
                                                           .Arg<ffi::AnyBuffer>()
                                                           .Arg<ffi::AnyBuffer>()
                                                           .Arg<ffi::Buffer<ffi::S32>>()
                                                           .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_copy_rows, CopyRows, ffi::Ffi::Bind()
                                                            .Arg<ffi::AnyBuffer>()
                                                            .Arg<ffi::AnyBuffer>()
                                                            .Arg<ffi::Buffer<ffi::S32>>()
                                                            .Arg<ffi::Buffer<ffi::S32>>()
                                                            .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_take_rows, TakeRows, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
