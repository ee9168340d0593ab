// Weight-only quantized matmul for CPU decode (lmstack.quant).
//
// Why this exists: decode is a GEMV per weight matrix, so its speed is set by
// how many weight bytes stream from DRAM per token. Storing weights as int8 or
// 4-bit and multiplying with *integer* dot products (activations quantized to
// int8 per block of 32, as llama.cpp's Q8_0) keeps the arithmetic cheap enough
// that the kernel stays memory bound.
//
// Formats, over output channels n and blocks b of 32 inputs:
//   q8  : codes int8 in [-127, 127], scales fp16 (N, K/32) (stored as int16 bits)
//         w[n, 32b + i] = scales[n, b] * code
//   q4  : codes in [0, 15], scales and mins fp16 bits (N, Kp/32), Kp = K rounded
//         up to 64. A 32-byte chunk p holds element 64p + j of a row in the
//         low nibble of byte j and 64p + 32 + j in the high nibble, so one
//         256-bit load + mask/shift yields two whole blocks (no shuffles).
//         w[n, 32b + i] = scales[n, b] * code + mins[n, b]
//   qweight is (ceil(N/4), chunks per row, 4, 32): 4 consecutive rows are
//   interleaved chunk by chunk so a 4-row tile is one contiguous stream
//   (see row_ptr). Padding rows are zero; scales stay row-major, unpadded.
// Activations: x (M, K) float32 -> xq int8 (M, Kp), dx (M, Kp/32) with
//   dx = amax / 127 and xq = round_half_even(x * (127 / amax)), plus
//   xs = dx * sum(xq) per block (the `mins` term of q4).
// y[m, n] = sum_b dw[n,b] * dx[m,b] * <wq, xq>_b   (+ mins[n,b] * xs[m,b] for q4)
//
// Letters: M activation rows, N output channels, K inputs, b block, R rows
// per tile, MT activation rows per tile.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "parallel.h"
#include "simd.h"

namespace {

constexpr int64_t QK = 32;  // block size

struct Act {
  const int8_t* q;  // (M, Kp)
  const float* d;   // (M, nb)
  const float* s;   // (M, nb)
  int64_t Kp, nb;
};

inline float half_to_float(at::Half h) { return static_cast<float>(h); }

// Scales are stored as int16 tensors holding fp16 bits, so model.to(bfloat16)
// (which converts floating buffers) cannot silently round them.
inline const at::Half* f16_bits(const at::Tensor& t) { return static_cast<const at::Half*>(t.data_ptr()); }

#ifdef __AVX2__
using lmstack::hmax;
using lmstack::hsum;
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
inline __m256 load_half8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// <w, x> for signed int8 blocks via the sign trick: maddubs needs one unsigned
// operand, so use |w| and move w's sign onto x. |w|, |x| <= 127 keeps the
// pairwise int16 sums below saturation.
inline __m256i dot_i8(__m256i aw, __m256i w, __m256i x, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), ones);
}
// <q, x> with q unsigned 4-bit: maddubs directly, no sign trick needed.
inline __m256i dot_u4(__m256i q, __m256i x, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
}
#endif

// One block of 32 floats -> int8, scale and (scale * sum). Rounding must match
// the PyTorch reference bit for bit: x * (127 / amax), round half to even.
void quantize_block(const float* x, int8_t* q, float* d, float* s) {
#ifdef __AVX2__
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  const float am = hmax(amax);
  const float id = am > 0.f ? 127.f / am : 0.f;
  const __m256 mul = _mm256_set1_ps(id);
  __m256i i[4];
  for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], mul));
  const int32_t sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
#else
  float am = 0.f;
  for (int j = 0; j < QK; ++j) am = std::max(am, std::fabs(x[j]));
  const float id = am > 0.f ? 127.f / am : 0.f;
  int32_t sum = 0;
  for (int j = 0; j < QK; ++j) {
    q[j] = static_cast<int8_t>(std::nearbyint(x[j] * id));
    sum += q[j];
  }
#endif
  *d = am / 127.f;
  *s = *d * static_cast<float>(sum);
}

// Quantize every activation row once per call (not once per output row), into
// per-thread scratch that is reused across calls: decode makes ~170 small
// matmuls per token, so allocations would be a visible share of each.
Act quantize_act(const float* x, int64_t M, int64_t K, int64_t Kp) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d, s;
  const int64_t nb = Kp / QK;
  q.resize(M * Kp);
  d.resize(M * nb);
  s.resize(M * nb);
  int8_t* qp = q.data();
  float* dp = d.data();
  float* sp = s.data();
  for (int64_t m = 0; m < M; ++m) {  // M < PREFILL_MIN_ROWS here: not worth threads
    for (int64_t b = 0; b < K / QK; ++b)
      quantize_block(x + m * K + b * QK, qp + m * Kp + b * QK, dp + m * nb + b, sp + m * nb + b);
    std::fill(qp + m * Kp + K, qp + (m + 1) * Kp, int8_t(0));  // q4 padding blocks
    std::fill(dp + m * nb + K / QK, dp + (m + 1) * nb, 0.f);
    std::fill(sp + m * nb + K / QK, sp + (m + 1) * nb, 0.f);
  }
  return {qp, dp, sp, Kp, nb};
}

// ---------------------------------------------------------------- tiles ----
// A tile is R consecutive output channels x MT activation rows. Each weight
// chunk is loaded (and unpacked) once and dotted against all MT rows; the
// activation blocks come from L1. `sc` is scratch for the R*MT*nb combined
// scales dw*dx, computed vectorized before the hot loop so it only does
// broadcast + fma per block.
//
// Weights: G = 4 consecutive rows are interleaved chunk by chunk, so chunk c
// of row n lies at base + (n / G) * G * row_bytes + c * G * 32 + (n % G) * 32
// and a 4-row tile streams one contiguous run of memory. The hardware
// prefetcher follows that far better than 4 short interleaved streams (rows are
// only 448-896 bytes long); measured ~1.5x on 896-wide layers. Strides are
// compile-time constants so the hot loop keeps every accumulator in a register.

constexpr int G = 4;
constexpr int64_t CHUNK_STRIDE = G * QK;

inline const uint8_t* row_ptr(const uint8_t* base, int64_t row_bytes, int64_t n) {
  return base + (n / G) * G * row_bytes + (n % G) * QK;
}

template <int R, int MT>
void combined_scales(const at::Half* wd, const float* dx, int64_t nb, float* sc) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      const at::Half* wr = wd + r * nb;
      const float* xr = dx + m * nb;
      float* o = sc + (r * MT + m) * nb;
      int64_t b = 0;
#ifdef __AVX2__
      for (; b + 8 <= nb; b += 8) _mm256_storeu_ps(o + b, _mm256_mul_ps(load_half8(wr + b), _mm256_loadu_ps(xr + b)));
#endif
      for (; b < nb; ++b) o[b] = half_to_float(wr[b]) * xr[b];
    }
}

// Calls f(integral_constant<0>) ... f(integral_constant<N-1>). Tile loops use it so
// accumulator indices are constants from the start: GCC then keeps the
// accumulator array in registers (with plain loops it round-trips one through
// the stack every iteration, measured 1.3x slower).
template <int N, class F>
inline __attribute__((always_inline)) void static_for(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }(
      std::make_integer_sequence<int, N>{});
}

#ifdef __AVX2__
// Prefetch the same chunk one row group ahead (pf bytes), once per cache line.
template <int R>
inline void prefetch_chunk(const uint8_t* chunk, int64_t pf) {
  for (int off = 0; off < R * QK; off += 64) _mm_prefetch(reinterpret_cast<const char*>(chunk + pf + off), _MM_HINT_T0);
}
#endif

template <int R, int MT>
void q8_tile(const int8_t* w, int64_t pf, const at::Half* wd, const Act& a, float* sc, float out[R][MT]) {
  const int64_t nb = a.nb;
  combined_scales<R, MT>(wd, a.d, nb, sc);
#ifdef __AVX2__
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R * MT];
  for (int i = 0; i < R * MT; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = w + b * CHUNK_STRIDE;
    prefetch_chunk<R>(reinterpret_cast<const uint8_t*>(wb), pf);
    __m256i x[MT];
    static_for<MT>([&](auto m) { x[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + m * a.Kp + b * QK)); });
    static_for<R>([&](auto r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * QK));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      static_for<MT>([&](auto m) {
        const __m256 p = _mm256_cvtepi32_ps(dot_i8(aw, wv, x[m], ones));
        acc[r * MT + m] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(sc + (r * MT + m) * nb + b), acc[r * MT + m]);
      });
    });
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = hsum(acc[r * MT + m]);
#else
  (void)pf;
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        for (int j = 0; j < QK; ++j) dot += int32_t(w[b * CHUNK_STRIDE + r * QK + j]) * a.q[m * a.Kp + b * QK + j];
        acc += float(dot) * sc[(r * MT + m) * nb + b];
      }
      out[r][m] = acc;
    }
#endif
}

template <int R, int MT>
void q4_tile(const uint8_t* w, int64_t pf, const at::Half* wd, const at::Half* wm, const Act& a, float* sc,
             float out[R][MT]) {
  const int64_t nb = a.nb;
  combined_scales<R, MT>(wd, a.d, nb, sc);
  float corr[R][MT];  // sum_b mins[n,b] * xs[m,b]
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      const at::Half* mr = wm + r * nb;
      const float* xs = a.s + m * nb;
      float c = 0.f;
      int64_t b = 0;
#ifdef __AVX2__
      __m256 cv = _mm256_setzero_ps();
      for (; b + 8 <= nb; b += 8) cv = _mm256_fmadd_ps(load_half8(mr + b), _mm256_loadu_ps(xs + b), cv);
      c = hsum(cv);
#endif
      for (; b < nb; ++b) c += half_to_float(mr[b]) * xs[b];
      corr[r][m] = c;
    }
#ifdef __AVX2__
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256 acc[R * MT];
  for (int i = 0; i < R * MT; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t p = 0; p < nb / 2; ++p) {
    const uint8_t* wp = w + p * CHUNK_STRIDE;
    prefetch_chunk<R>(wp, pf);
    __m256i xa[MT], xb[MT];
    static_for<MT>([&](auto m) {
      xa[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + m * a.Kp + p * 2 * QK));
      xb[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + m * a.Kp + p * 2 * QK + QK));
    });
    static_for<R>([&](auto r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + r * QK));
      const __m256i lo = _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      static_for<MT>([&](auto m) {
        const float* s = sc + (r * MT + m) * nb + 2 * p;
        __m256& c = acc[r * MT + m];
        c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4(lo, xa[m], ones)), _mm256_broadcast_ss(s), c);
        c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4(hi, xb[m], ones)), _mm256_broadcast_ss(s + 1), c);
      });
    });
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = hsum(acc[r * MT + m]) + corr[r][m];
#else
  (void)pf;
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = w + (b / 2) * CHUNK_STRIDE + r * QK;
        const int shift = (b % 2) * 4;
        int32_t dot = 0;
        for (int j = 0; j < QK; ++j) dot += int32_t((wb[j] >> shift) & 0x0f) * a.q[m * a.Kp + b * QK + j];
        acc += float(dot) * sc[(r * MT + m) * nb + b];
      }
      out[r][m] = acc + corr[r][m];
    }
#endif
}

// --------------------------------------------------------------- driver ----
// Output channels are split into chunks of ~64 KiB of weights that threads claim
// (see share_chunks in parallel.h).

constexpr int MAX_MT = 4;

// Expands the runtime activation-row count into template instantiations.
#define LMSTACK_DISPATCH_MT(MT_VAR, ...)                   \
  switch (MT_VAR) {                                         \
    case 1: { constexpr int MT = 1; __VA_ARGS__; break; }   \
    case 2: { constexpr int MT = 2; __VA_ARGS__; break; }   \
    case 3: { constexpr int MT = 3; __VA_ARGS__; break; }   \
    default: { constexpr int MT = 4; __VA_ARGS__; break; }  \
  }

struct Q8Tile {
  const uint8_t* w; int64_t row_bytes; const at::Half* d; Act a;
  template <int R, int MT>
  void call(int64_t n, int64_t m, float* sc, float (*out)[MAX_MT]) const {
    const Act am{a.q + m * a.Kp, a.d + m * a.nb, a.s + m * a.nb, a.Kp, a.nb};
    float o[R][MT];
    q8_tile<R, MT>(reinterpret_cast<const int8_t*>(row_ptr(w, row_bytes, n)), G * row_bytes, d + n * a.nb, am, sc, o);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MT; ++j) out[r][j] = o[r][j];
  }
};

struct Q4Tile {
  const uint8_t* w; int64_t row_bytes; const at::Half* d; const at::Half* mn; Act a;
  template <int R, int MT>
  void call(int64_t n, int64_t m, float* sc, float (*out)[MAX_MT]) const {
    const Act am{a.q + m * a.Kp, a.d + m * a.nb, a.s + m * a.nb, a.Kp, a.nb};
    float o[R][MT];
    q4_tile<R, MT>(row_ptr(w, row_bytes, n), G * row_bytes, d + n * a.nb, mn + n * a.nb, am, sc, o);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MT; ++j) out[r][j] = o[r][j];
  }
};

// R output channels per tile (R divides G, so a tile never straddles a row
// group); MT_MAX activation rows per pass over it.
template <int R, int MT_MAX, class Tile>
void run_tiles(const Tile& tile, int64_t M, int64_t N, float* y, const float* bias) {
  static_assert(MT_MAX <= MAX_MT && G % R == 0, "bad tile shape");
  const int64_t nb = tile.a.nb;
  const int64_t ntiles = (N + R - 1) / R;
  const int64_t chunk = std::max<int64_t>(1, (64 << 10) / (R * tile.row_bytes));  // tiles per claim
  const int64_t nchunks = (ntiles + chunk - 1) / chunk;
  lmstack::share_chunks(nchunks, [&](int64_t c) {
    thread_local std::vector<float> sc;  // combined scales, reused across calls
    sc.resize(R * MT_MAX * nb);
    float out[R][MAX_MT];
    for (int64_t t = c * chunk; t < std::min(ntiles, (c + 1) * chunk); ++t) {
      const int64_t n = t * R;
      for (int64_t m = 0; m < M; m += MT_MAX) {
        const int64_t mt = std::min<int64_t>(MT_MAX, M - m);
        if (n + R <= N) {
          LMSTACK_DISPATCH_MT(mt, tile.template call<R, (MT > MT_MAX ? MT_MAX : MT)>(n, m, sc.data(), out))
        } else {
          for (int64_t r = 0; n + r < N; ++r)
            LMSTACK_DISPATCH_MT(mt, tile.template call<1, (MT > MT_MAX ? MT_MAX : MT)>(n + r, m, sc.data(), out + r))
        }
        for (int64_t r = 0; r < R && n + r < N; ++r)
          for (int64_t j = 0; j < mt; ++j) y[(m + j) * N + n + r] = out[r][j] + (bias ? bias[n + r] : 0.f);
      }
    }
  });
}

template <class Tile>
void run(const Tile& tile, int64_t M, int64_t N, float* y, const float* bias) {
  // GEMV: a whole row group per tile amortizes each activation load. Small-M
  // GEMM: 2 channels x 4 rows keeps 8 accumulators in the 16 ymm registers.
  if (M == 1)
    run_tiles<4, 1>(tile, M, N, y, bias);
  else
    run_tiles<2, 4>(tile, M, N, y, bias);  // measured equal to 4 x 2
}

// x's data as contiguous float32: x itself in the common case, so the hot path
// creates no views (each costs autograd view bookkeeping).
at::Tensor float_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && at::isFloatingType(x.scalar_type()),
              "x must be a floating-point CPU tensor");
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, weight expects ", K);
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x;
  return x.to(at::kFloat).contiguous();
}

// float32 output shaped (..., N) like x.
at::Tensor output_for(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return at::empty(shape, x.options().dtype(at::kFloat));
}

// Bias as contiguous float32 (empty if none), whatever dtype the module was moved to.
at::Tensor float_bias(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->numel() == N, "bias must have ", N, " elements");
  return bias->to(at::kFloat).contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Validates a packed weight (ceil(N/G), chunks, G, 32) against its (N, nb) scales.
void check_packed(const at::Tensor& qweight, const at::Tensor& scales, at::ScalarType code_type, int64_t nb) {
  TORCH_CHECK(qweight.dim() == 4 && qweight.size(2) == G && qweight.size(3) == QK &&
                  qweight.scalar_type() == code_type && qweight.is_contiguous(),
              "packed weight must be contiguous (groups, chunks, ", G, ", 32)");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kShort && scales.is_contiguous() &&
                  scales.size(1) == nb && scales.size(0) <= qweight.size(0) * qweight.size(2),
              "scales must be contiguous int16 fp16-bits (N, ", nb, ")");
}

// ------------------------------------------------------------------ ops ----

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias) {
  const int64_t nb = qweight.size(1), K = nb * QK, N = scales.size(0);
  check_packed(qweight, scales, at::kChar, nb);
  const at::Tensor xf = float_rows(x, K);
  const int64_t M = xf.numel() / K;
  const Act a = quantize_act(xf.data_ptr<float>(), M, K, K);
  at::Tensor y = output_for(x, N);
  const Q8Tile tile{static_cast<const uint8_t*>(qweight.data_ptr()), K, f16_bits(scales), a};
  const at::Tensor b = float_bias(bias, N);
  run(tile, M, N, y.data_ptr<float>(), ptr_or_null(b));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins, const c10::optional<at::Tensor>& bias) {
  const int64_t Kp = qweight.size(1) * 2 * QK, nb = Kp / QK, N = scales.size(0), K = x.size(-1);
  check_packed(qweight, scales, at::kByte, nb);
  check_packed(qweight, mins, at::kByte, nb);
  TORCH_CHECK(K % QK == 0 && K <= Kp && Kp - K < 2 * QK, "x has ", K, " features, incompatible with packed width ",
              Kp);
  const at::Tensor xf = float_rows(x, K);
  const int64_t M = xf.numel() / K;
  const Act a = quantize_act(xf.data_ptr<float>(), M, K, Kp);
  at::Tensor y = output_for(x, N);
  const Q4Tile tile{qweight.data_ptr<uint8_t>(), Kp / 2, f16_bits(scales), f16_bits(mins), a};
  const at::Tensor b = float_bias(bias, N);
  run(tile, M, N, y.data_ptr<float>(), ptr_or_null(b));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

void check_ids(const at::Tensor& ids, int64_t N) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.device().is_cpu(),
              "ids must be contiguous int64 on CPU");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < N, "row id ", id[i], " out of range [0, ", N, ")");
}

// Gather rows `ids` and dequantize to float32 (L, K): the embedding lookup, and
// the tile source for the prefill path (dequantize + sgemm beats integer dots at large M).
at::Tensor q8_dequant_rows(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& ids) {
  const int64_t nb = qweight.size(1), K = nb * QK, G = qweight.size(2), L = ids.numel();
  check_packed(qweight, scales, at::kChar, nb);
  check_ids(ids, scales.size(0));
  at::Tensor out = at::empty({L, K}, scales.options().dtype(at::kFloat));
  const uint8_t* w = static_cast<const uint8_t*>(qweight.data_ptr());
  const at::Half* d = f16_bits(scales);
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, L, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int8_t* wr = reinterpret_cast<const int8_t*>(row_ptr(w, K, id[i]));
      for (int64_t b = 0; b < nb; ++b) {
        const float s = half_to_float(d[id[i] * nb + b]);
        for (int j = 0; j < QK; ++j) o[i * K + b * QK + j] = s * float(wr[b * CHUNK_STRIDE + j]);
      }
    }
  });
  return out;
}

at::Tensor q4_dequant_rows(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                           const at::Tensor& ids, int64_t K) {
  const int64_t Kp = qweight.size(1) * 2 * QK, nb = Kp / QK, G = qweight.size(2), L = ids.numel();
  check_packed(qweight, scales, at::kByte, nb);
  check_packed(qweight, mins, at::kByte, nb);
  check_ids(ids, scales.size(0));
  TORCH_CHECK(K <= Kp && K % QK == 0, "K=", K, " does not fit packed width ", Kp);
  at::Tensor out = at::empty({L, K}, scales.options().dtype(at::kFloat));
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const at::Half* d = f16_bits(scales);
  const at::Half* mn = f16_bits(mins);
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, L, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* wr = row_ptr(w, Kp / 2, id[i]);
      for (int64_t b = 0; b < K / QK; ++b) {
        const float s = half_to_float(d[id[i] * nb + b]), m = half_to_float(mn[id[i] * nb + b]);
        const uint8_t* wb = wr + (b / 2) * CHUNK_STRIDE;
        const int shift = (b % 2) * 4;
        for (int j = 0; j < QK; ++j) o[i * K + b * QK + j] = s * float((wb[j] >> shift) & 0x0f) + m;
      }
    }
  });
  return out;
}

// Exposed so tests can check the C++ activation quantizer against the reference.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x, int64_t Kp) {
  const at::Tensor x2 = float_rows(x, x.size(-1)).reshape({-1, x.size(-1)});
  const int64_t M = x2.size(0), K = x2.size(1), nb = Kp / QK;
  TORCH_CHECK(K % QK == 0 && Kp % QK == 0 && Kp >= K, "bad activation width");
  const Act a = quantize_act(x2.data_ptr<float>(), M, K, Kp);
  at::Tensor q = at::empty({M, Kp}, x2.options().dtype(at::kChar)), d = at::empty({M, nb}, x2.options()),
             s = at::empty({M, nb}, x2.options());
  std::copy(a.q, a.q + M * Kp, q.data_ptr<int8_t>());
  std::copy(a.d, a.d + M * nb, d.data_ptr<float>());
  std::copy(a.s, a.s + M * nb, s.data_ptr<float>());
  return {q, d, s};
}

// Scale and min per block of 32 weights for q4: the least-squares refit of the
// codes of each candidate grid in `r_steps` (see lmstack.quant.fit_q4_blocks,
// the reference), keeping the one with the least (importance-weighted) squared
// error. wb (nblocks, 32) float32 rows of nb blocks each; importance empty or
// (nb, 32), one weight per input column -> d, m (nblocks,) float16.
namespace fit {
inline float recon_err(const float* x, const float* w, float d, float m) {
  const float inv = d > 0 ? 1.f / d : 0.f;
  float err = 0.f;
  for (int i = 0; i < QK; ++i) {
    const float q = std::min(15.f, std::max(0.f, std::nearbyint((x[i] - m) * inv)));
    const float e = q * d + m - x[i];
    err += w[i] * e * e;
  }
  return err;
}
inline float f16(float v) { return static_cast<float>(static_cast<at::Half>(v)); }
}  // namespace fit

std::vector<at::Tensor> q4_fit_blocks(const at::Tensor& wb, const std::vector<double>& r_steps,
                                      const at::Tensor& importance) {
  TORCH_CHECK(wb.device().is_cpu() && wb.scalar_type() == at::kFloat && wb.dim() == 2 && wb.size(1) == QK &&
                  wb.is_contiguous(),
              "wb must be contiguous float32 (blocks, 32)");
  const bool weighted = importance.numel() > 0;
  TORCH_CHECK(!weighted || (importance.scalar_type() == at::kFloat && importance.is_contiguous() &&
                            importance.numel() % QK == 0 && wb.size(0) % (importance.numel() / QK) == 0),
              "importance must be contiguous float32 (nb, 32) with nb dividing the block count");
  const int64_t nblocks = wb.size(0), nb = weighted ? importance.numel() / QK : 1;
  at::Tensor d = at::empty({nblocks}, wb.options().dtype(at::kHalf)), m = at::empty_like(d);
  const float* x0 = wb.data_ptr<float>();
  const float* w0 = weighted ? importance.data_ptr<float>() : nullptr;
  at::Half* dp = d.data_ptr<at::Half>();
  at::Half* mp = m.data_ptr<at::Half>();
  at::parallel_for(0, nblocks, 1024, [&](int64_t b0, int64_t b1) {
    float ones[QK];
    std::fill(ones, ones + QK, 1.f);
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = x0 + b * QK;
      const float* w = weighted ? w0 + (b % nb) * QK : ones;
      float lo = x[0], hi = x[0], sw = 0.f, sx = 0.f;
      for (int i = 0; i < QK; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]), sw += w[i], sx += w[i] * x[i];
      const float span = std::max(hi - lo, 1e-20f);
      float best_d = fit::f16((hi - lo) / 15), best_m = fit::f16(lo);
      float best_err = fit::recon_err(x, w, best_d, best_m);
      for (const double r : r_steps) {
        const float iscale = static_cast<float>(15 + r) / span;
        float sq = 0.f, sqq = 0.f, sqx = 0.f;
        for (int i = 0; i < QK; ++i) {
          const float q = std::min(15.f, std::max(0.f, std::nearbyint((x[i] - lo) * iscale)));
          sq += w[i] * q, sqq += w[i] * q * q, sqx += w[i] * q * x[i];
        }
        const float det = sw * sqq - sq * sq;
        if (!(det > 0)) continue;
        const float dd = fit::f16((sw * sqx - sq * sx) / det), mm = fit::f16((sqq * sx - sq * sqx) / det);
        if (!(dd > 0)) continue;
        const float err = fit::recon_err(x, w, dd, mm);
        if (err < best_err) best_d = dd, best_m = mm, best_err = err;
      }
      dp[b] = static_cast<at::Half>(best_d);
      mp[b] = static_cast<at::Half>(best_m);
    }
  });
  return {d, m};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a matmul runs so other Python threads (a server's
  // event loop, a tokenizer) keep going.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("q8_linear", &q8_linear, "y = x @ dequant(q8 weight).T (+ bias), int8 activations", release());
  m.def("q4_linear", &q4_linear, "y = x @ dequant(q4 weight).T (+ bias), int8 activations", release());
  m.def("q8_dequant_rows", &q8_dequant_rows, "gather + dequantize q8 rows", release());
  m.def("q4_dequant_rows", &q4_dequant_rows, "gather + dequantize q4 rows", release());
  m.def("q4_fit_blocks", &q4_fit_blocks, "q4 scale and min per 32-block, least-squares grid search", release());
  m.def("quantize_activations", &quantize_activations, "x -> (int8, scale, scale*sum) per 32-block", release());
#ifdef __AVX2__
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "scalar";
#endif
}
