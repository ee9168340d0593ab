// Fused float32 ops for CPU decode (lmstack.models).
//
// Why this exists: a decode step of a 0.5B model runs ~50 small PyTorch ops per
// layer (norms, RoPE, KV-cache writes, attention over a few hundred keys). Each
// costs 2-75 us of dispatch and generic-kernel overhead, ~10-15 ms per token in
// all, as much as the quantized matmuls themselves. These three ops replace the
// chains with one call each; the PyTorch paths in lmstack/models stay the
// reference that tests compare against, and are used for prefill, off-CPU and
// when this extension cannot be built.
//
//   rms_norm          y = x * rsqrt(mean(x^2) + eps) * w      (or * (1 + w))
//   gated_act         y = act(a) * b                          (SwiGLU / GeGLU)
//   cached_attention  RoPE on q and k, write k/v into the cache at input_pos,
//                     causal (optionally sliding-window, soft-capped) attention
//                     of each query over the cached keys, GQA
//   paged_attention   the same attention for the engine's flattened batch,
//                     reading keys in place through per-request block tables
//
// Letters: B batch, T new tokens, nh query heads, nkv key/value heads, hs head
// size, rd rotary dims, S visible keys, Smax cache length.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "parallel.h"
#include "simd.h"

namespace {

// Runs body(i) for i in [0, n): on the calling thread when the work is small (a decode step over a
// short context, where waking a helper costs more than it saves), else shared with helper threads
// as the quantized matmuls are (lmstack::share_chunks: no spinning OpenMP barrier competing with them).
template <class Body>
void for_items(int64_t n, int64_t macs_per_item, const Body& body) {
  constexpr int64_t kSerialMacs = 1 << 20;
  if (n * macs_per_item < kSerialMacs) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  lmstack::share_chunks(n, body);
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef __AVX2__
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  s = lmstack::hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[i] += w * x[i]
inline void axpy(float w, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 vw = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * x[i];
}

// NeoX-style RoPE of the first rd channels of one head: pairs (i, i + rd/2).
inline void rope(const float* x, const float* cos, const float* sin, int64_t rd, int64_t hs, float* out) {
  const int64_t half = rd / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
  for (int64_t i = rd; i < hs; ++i) out[i] = x[i];
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

// Rows of a (..., C) tensor whose last dim is contiguous: (pointer, row count, row stride).
struct Rows {
  float* p;
  int64_t n, stride;
};

Rows rows_of(const at::Tensor& t, int64_t C, const char* name) {
  check_float_cpu(t, name);
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == C && t.stride(-1) == 1, name, " must be (..., ", C,
              ") with a contiguous last dim");
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) n *= t.size(d);
  // Rows must be evenly spaced: true for contiguous tensors and for column slices of them.
  int64_t stride = t.dim() >= 2 ? t.stride(-2) : C;
  for (int64_t d = t.dim() - 2; d > 0; --d)
    TORCH_CHECK(t.size(d) == 1 || t.stride(d - 1) == t.stride(d) * t.size(d) || t.size(d - 1) == 1, name,
                " rows must be evenly spaced");
  return {t.data_ptr<float>(), n, stride};
}

at::Tensor out_like(const at::Tensor& x, int64_t C) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = C;
  return at::empty(shape, x.options());
}

// ------------------------------------------------------------------ ops ----

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool unit_offset) {
  const int64_t C = weight.numel();
  check_float_cpu(weight, "weight");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const Rows xr = rows_of(x, C, "x");
  at::Tensor y = out_like(x, C);
  float* yp = y.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  for_items(xr.n, 2 * C, [&](int64_t r) {
    {
      const float* xi = xr.p + r * xr.stride;
      float* yi = yp + r * C;
      const float inv = 1.f / std::sqrt(dot(xi, xi, C) / C + static_cast<float>(eps));
      if (unit_offset)
        for (int64_t i = 0; i < C; ++i) yi[i] = xi[i] * inv * (1.f + w[i]);
      else
        for (int64_t i = 0; i < C; ++i) yi[i] = w[i] * (xi[i] * inv);
    }
  });
  return y;
}

// act: 0 SiLU, 1 GELU (tanh approximation), 2 GELU (erf)
at::Tensor gated_act(const at::Tensor& a, const at::Tensor& b, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, "act must be 0 (silu), 1 (gelu tanh) or 2 (gelu erf)");
  const int64_t H = a.size(-1);
  TORCH_CHECK(b.sizes() == a.sizes(), "a and b must have the same shape");
  const Rows ar = rows_of(a, H, "a"), br = rows_of(b, H, "b");
  at::Tensor y = out_like(a, H);
  float* yp = y.data_ptr<float>();
  for_items(ar.n, 16 * H, [&](int64_t r) {  // ~16 flops per element for exp / tanh / erf
    {
      const float* ai = ar.p + r * ar.stride;
      const float* bi = br.p + r * br.stride;
      float* yi = yp + r * H;
      if (act == 0) {
        for (int64_t i = 0; i < H; ++i) yi[i] = ai[i] / (1.f + std::exp(-ai[i])) * bi[i];
      } else if (act == 1) {
        constexpr float k = 0.7978845608028654f;  // sqrt(2 / pi)
        for (int64_t i = 0; i < H; ++i) {
          const float v = ai[i];
          yi[i] = 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v))) * bi[i];
        }
      } else {
        for (int64_t i = 0; i < H; ++i) yi[i] = 0.5f * ai[i] * (1.f + std::erf(ai[i] * 0.7071067811865476f)) * bi[i];
      }
    }
  });
  return y;
}

// q (B, T, nh*hs), k, v (B, T, nkv*hs): last dim contiguous (views of a fused projection are fine).
// k_cache, v_cache (B, nkv, Smax, hs) contiguous; cos, sin (T, rd) or empty; input_pos (T,) int64.
// softcap <= 0: none. window <= 0: full causal. Returns y (B, T, nh*hs).
at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& input_pos, const at::Tensor& cos,
                            const at::Tensor& sin, double scale, double softcap, int64_t window) {
  check_float_cpu(k_cache, "k_cache");
  check_float_cpu(v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "caches must be contiguous (B, nkv, Smax, hs) and alike");
  const int64_t B = k_cache.size(0), nkv = k_cache.size(1), Smax = k_cache.size(2), hs = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(0) == B && q.size(2) % hs == 0, "q must be (B, T, nh*hs)");
  const int64_t T = q.size(1), nh = q.size(2) / hs, group = nh / nkv;
  TORCH_CHECK(nh % nkv == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(k.dim() == 3 && k.size(0) == B && k.size(1) == T && k.size(2) == nkv * hs && v.sizes() == k.sizes(),
              "k and v must be (B, T, nkv*hs)");
  TORCH_CHECK(input_pos.dim() == 1 && input_pos.size(0) == T && input_pos.scalar_type() == at::kLong &&
                  input_pos.device().is_cpu(),
              "input_pos must be an int64 CPU tensor (T,)");
  const Rows qr = rows_of(q, nh * hs, "q"), kr = rows_of(k, nkv * hs, "k"), vr = rows_of(v, nkv * hs, "v");
  const int64_t rd = cos.defined() && cos.numel() ? cos.size(-1) : 0;
  if (rd) {
    check_float_cpu(cos, "cos");
    check_float_cpu(sin, "sin");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * rd && sin.numel() == T * rd &&
                    rd % 2 == 0 && rd <= hs,
                "cos and sin must be contiguous (T, rd) with an even rd <= head size");
  }
  const auto ip = input_pos.contiguous();
  const int64_t* pos = ip.data_ptr<int64_t>();
  int64_t kv_len = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < Smax, "position ", pos[t], " is outside the KV cache of ", Smax);
    kv_len = std::max(kv_len, pos[t] + 1);
  }
  const float* cp = rd ? cos.data_ptr<float>() : nullptr;
  const float* sp = rd ? sin.data_ptr<float>() : nullptr;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();

  // 1. new keys (rotated) and values into the cache
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < nkv; ++h) {
        const int64_t row = b * T + t;
        float* kd = kc + ((b * nkv + h) * Smax + pos[t]) * hs;
        const float* ks = kr.p + row * kr.stride + h * hs;
        if (rd)
          rope(ks, cp + t * rd, sp + t * rd, rd, hs, kd);
        else
          std::copy(ks, ks + hs, kd);
        const float* vs = vr.p + row * vr.stride + h * hs;
        std::copy(vs, vs + hs, vc + ((b * nkv + h) * Smax + pos[t]) * hs);
      }

  // 2. each (batch row, head, query) attends over its visible keys
  at::Tensor y = at::empty({B, T, nh * hs}, q.options());
  float* yp = y.data_ptr<float>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  for_items(B * nh * T, 2 * kv_len * hs, [&](int64_t w) {
    thread_local std::vector<float> qrot, logits;
    qrot.resize(hs);
    logits.resize(kv_len);
    {
      const int64_t t = w % T, h = (w / T) % nh, b = w / (T * nh);
      const float* qs = qr.p + (b * T + t) * qr.stride + h * hs;
      if (rd)
        rope(qs, cp + t * rd, sp + t * rd, rd, hs, qrot.data());
      else
        std::copy(qs, qs + hs, qrot.data());
      const int64_t p = pos[t];
      const int64_t s0 = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0, s1 = p + 1;
      const float* kh = kc + (b * nkv + h / group) * Smax * hs;
      const float* vh = vc + (b * nkv + h / group) * Smax * hs;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t s = s0; s < s1; ++s) {
        float l = dot(qrot.data(), kh + s * hs, hs) * sc;
        if (cap > 0) l = cap * std::tanh(l / cap);
        logits[s] = l;
        mx = std::max(mx, l);
      }
      float sum = 0.f;
      for (int64_t s = s0; s < s1; ++s) sum += (logits[s] = std::exp(logits[s] - mx));
      float* out = yp + (b * T + t) * nh * hs + h * hs;
      std::fill(out, out + hs, 0.f);
      const float inv = 1.f / sum;
      for (int64_t s = s0; s < s1; ++s) axpy(logits[s] * inv, vh + s * hs, out, hs);
    }
  });
  return y;
}

// Attention of a flattened engine batch over a paged KV cache, read in place through block tables (no
// gather). q (N, nh, hs) contiguous, already rotated; k_cache, v_cache (num_blocks, bs, nkv, hs) contiguous,
// this step's keys already written; block_table (R, max_nb) int64; query_start (R+1,) int64: request r owns
// q rows [query_start[r], query_start[r+1]), the last tokens of its seq_lens[r] (R,) int64 tokens.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& query_start, const at::Tensor& seq_lens,
                           double scale, double softcap, int64_t window) {
  check_float_cpu(q, "q");
  check_float_cpu(k_cache, "k_cache");
  check_float_cpu(v_cache, "v_cache");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous (N, nh, hs)");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "caches must be contiguous (num_blocks, block_size, nkv, hs) and alike");
  const int64_t N = q.size(0), nh = q.size(1), hs = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), nkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == hs && nh % nkv == 0, "q and cache head sizes / counts disagree");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kLong && block_table.is_contiguous(),
              "block_table must be contiguous int64 (R, max_blocks)");
  const int64_t R = block_table.size(0), max_nb = block_table.size(1);
  TORCH_CHECK(query_start.dim() == 1 && query_start.size(0) == R + 1 && query_start.scalar_type() == at::kLong &&
                  seq_lens.dim() == 1 && seq_lens.size(0) == R && seq_lens.scalar_type() == at::kLong,
              "query_start must be int64 (R+1,) and seq_lens int64 (R,)");
  const auto qs_t = query_start.contiguous(), sl_t = seq_lens.contiguous();
  const int64_t* qs = qs_t.data_ptr<int64_t>();
  const int64_t* sl = sl_t.data_ptr<int64_t>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  TORCH_CHECK(qs[0] == 0 && qs[R] == N, "query_start must run from 0 to N");
  int64_t max_len = 0;
  std::vector<int64_t> owner(N);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t nq = qs[r + 1] - qs[r];
    TORCH_CHECK(nq >= 0 && sl[r] >= nq && (sl[r] + bs - 1) / bs <= max_nb, "request ", r,
                ": bad query count, length or block table width");
    for (int64_t i = 0; i < (sl[r] + bs - 1) / bs; ++i)
      TORCH_CHECK(table[r * max_nb + i] >= 0 && table[r * max_nb + i] < num_blocks, "block id out of range");
    for (int64_t i = qs[r]; i < qs[r + 1]; ++i) owner[i] = r;
    max_len = std::max(max_len, sl[r]);
  }
  at::Tensor y = at::empty({N, nh, hs}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const int64_t group = nh / nkv;
  for_items(N * nh, 2 * max_len * hs, [&](int64_t w) {
    thread_local std::vector<float> logits;
    logits.resize(max_len);
    {
      const int64_t n = w / nh, h = w % nh, r = owner[n];
      const int64_t pos = sl[r] - (qs[r + 1] - n);  // this query's position
      const int64_t s0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t* blocks = table + r * max_nb;
      const int64_t g = h / group;
      const float* qh = qp + (n * nh + h) * hs;
      auto slot = [&](int64_t s) { return ((blocks[s / bs] * bs + s % bs) * nkv + g) * hs; };
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t s = s0; s <= pos; ++s) {
        float l = dot(qh, kc + slot(s), hs) * sc;
        if (cap > 0) l = cap * std::tanh(l / cap);
        logits[s] = l;
        mx = std::max(mx, l);
      }
      float sum = 0.f;
      for (int64_t s = s0; s <= pos; ++s) sum += (logits[s] = std::exp(logits[s] - mx));
      float* out = yp + (n * nh + h) * hs;
      std::fill(out, out + hs, 0.f);
      const float inv = 1.f / sum;
      for (int64_t s = s0; s <= pos; ++s) axpy(logits[s] * inv, vc + slot(s), out, hs);
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto release = [] { return py::call_guard<py::gil_scoped_release>(); };
  m.def("rms_norm", &rms_norm, "RMS normalization of float32 rows", release());
  m.def("gated_act", &gated_act, "act(a) * b for SwiGLU / GeGLU", release());
  m.def("paged_attention", &paged_attention, "attention of a flattened batch over a paged KV cache", release());
  m.def("cached_attention", &cached_attention, "RoPE + KV-cache write + causal attention for a few queries",
        release());
}
