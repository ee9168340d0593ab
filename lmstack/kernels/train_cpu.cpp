// Fused float32 forward/backward pairs for CPU training (lmstack.models under autograd).
//
// Why this exists: outside its matmuls, a LoRA step of a small model is chains of
// elementwise PyTorch ops, each a full pass over a (tokens x width) tensor, and
// autograd replays a longer chain in backward. RMSNorm is ~5 passes forward and
// ~8 backward, RoPE (with the head transpose SDPA wants) ~6 and ~6, SwiGLU's
// backward ~6. Each op here is one pass that keeps a row in cache. The PyTorch
// paths in lmstack/models stay the reference that tests compare against, and
// are used off-CPU and when this extension cannot be built.
//
//   rms_norm_fwd    y = x * r * w' and r = rsqrt(mean(x^2) + eps) per row    (w' = w or 1 + w)
//   rms_norm_bwd    dx = r * (g w' - x r^2 mean(g w' x))
//   gated_act_fwd   y = act(a) * b                                           (SwiGLU / GeGLU)
//   gated_act_bwd   da = g b act'(a), db = g act(a)
//   rope_heads      (B, T, n*hs) -> (B, n, T, hs) contiguous, RoPE on the first rd channels
//   rope_heads_bwd  its adjoint: (B, n, T, hs) -> (B, T, n*hs), rotated back
//   softmax_xent_   logits (N, V) -> each row's cross-entropy, the logits overwritten by its gradient
//                   softmax - onehot (through a soft-cap's tanh when there is one): one read of the
//                   block from memory instead of the ~5 passes of max, exp, sum, divide and scatter
//
// Letters: B batch, T tokens, n heads, hs head size, rd rotary dims, C row width.

#include <torch/extension.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "parallel.h"
#include "simd.h"

namespace {

// Rows in chunks of about 64 KiB, shared with helper threads (lmstack::share_chunks).
template <class Body>
void for_rows(int64_t rows, int64_t width, const Body& body) {
  const int64_t per = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(width, 1));
  const int64_t chunks = (rows + per - 1) / per;
  lmstack::share_chunks(chunks, [&](int64_t c) {
    const int64_t end = std::min(rows, (c + 1) * per);
    for (int64_t r = c * per; r < end; ++r) body(r);
  });
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

int64_t rows_of(const at::Tensor& t, int64_t C) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == C, "expected a (..., ", C, ") tensor");
  return C ? t.numel() / C : 0;
}

// ------------------------------------------------------------------ math ----

#ifdef __AVX2__
// e^x for x in [-87, 88], ~1 ulp: 2^n e^f with |f| <= ln2 / 2 and e^f by its degree-6 Taylor polynomial.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for precision
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

using lmstack::hmax;
using lmstack::hsum;
#endif

inline float sigmoid1(float x) { return 1.f / (1.f + std::exp(-x)); }

constexpr float kGeluTanh = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

// act: 0 SiLU, 1 GELU (tanh approximation), 2 GELU (erf). act(a) and, when d != nullptr, act'(a).
inline float act1(int64_t act, float a, float* d) {
  if (act == 0) {
    const float s = sigmoid1(a);
    if (d) *d = s * (1.f + a * (1.f - s));
    return a * s;
  }
  if (act == 1) {
    const float u = kGeluTanh * (a + kGeluCubic * a * a * a);
    const float t = std::tanh(u);
    if (d) *d = 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * kGeluTanh * (1.f + 3.f * kGeluCubic * a * a);
    return 0.5f * a * (1.f + t);
  }
  const float c = 0.5f * (1.f + std::erf(a * 0.7071067811865476f));
  if (d) *d = c + a * 0.3989422804014327f * std::exp(-0.5f * a * a);  // + a * pdf(a)
  return a * c;
}

#ifdef __AVX2__
// The same for 8 lanes (SiLU and tanh-GELU; erf stays scalar). tanh(u) = 2 sigmoid(2u) - 1.
inline __m256 act8(int64_t act, __m256 a, __m256* d) {
  const __m256 one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f);
  if (act == 0) {
    const __m256 s = sigmoid8(a);
    if (d) *d = _mm256_mul_ps(s, _mm256_fmadd_ps(a, _mm256_sub_ps(one, s), one));
    return _mm256_mul_ps(a, s);
  }
  const __m256 a2 = _mm256_mul_ps(a, a);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(kGeluTanh),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kGeluCubic), a2), a, a));
  const __m256 t = _mm256_fmsub_ps(_mm256_set1_ps(2.f), sigmoid8(_mm256_add_ps(u, u)), one);
  if (d) {
    const __m256 du = _mm256_mul_ps(_mm256_set1_ps(kGeluTanh),
                                    _mm256_fmadd_ps(_mm256_set1_ps(3.f * kGeluCubic), a2, one));
    const __m256 sech2 = _mm256_fnmadd_ps(t, t, one);
    *d = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(half, a), sech2), du, _mm256_mul_ps(half, _mm256_add_ps(one, t)));
  }
  return _mm256_mul_ps(_mm256_mul_ps(half, a), _mm256_add_ps(one, t));
}
#endif

// ------------------------------------------------------------------ ops ----

// w' = w, or 1 + w for Gemma's unit-offset norm
std::vector<float> norm_scale(const at::Tensor& weight, bool unit_offset) {
  check_float_cpu(weight, "weight");
  const float* w = weight.data_ptr<float>();
  std::vector<float> s(w, w + weight.numel());
  if (unit_offset)
    for (float& v : s) v += 1.f;
  return s;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                bool unit_offset) {
  check_float_cpu(x, "x");
  const int64_t C = weight.numel(), R = rows_of(x, C);
  const std::vector<float> w = norm_scale(weight, unit_offset);
  at::Tensor y = at::empty_like(x), rstd = at::empty({R}, x.options());
  const float* xp = x.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  for_rows(R, C, [&](int64_t r) {
    const float* xi = xp + r * C;
    float* yi = yp + r * C;
    int64_t i = 0;
    float ss = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= C; i += 8) {
      const __m256 v = _mm256_loadu_ps(xi + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    ss = hsum(acc);
#endif
    for (; i < C; ++i) ss += xi[i] * xi[i];
    const float inv = 1.f / std::sqrt(ss / C + static_cast<float>(eps));
    rp[r] = inv;
    for (i = 0; i < C; ++i) yi[i] = w[i] * (xi[i] * inv);
  });
  return {y, rstd};
}

at::Tensor rms_norm_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                        bool unit_offset) {
  check_float_cpu(g, "grad");
  check_float_cpu(x, "x");
  check_float_cpu(rstd, "rstd");
  const int64_t C = weight.numel(), R = rows_of(x, C);
  TORCH_CHECK(g.sizes() == x.sizes() && rstd.numel() == R, "grad, x and rstd do not match");
  const std::vector<float> w = norm_scale(weight, unit_offset);
  at::Tensor dx = at::empty_like(x);
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  for_rows(R, C, [&](int64_t r) {
    const float *gi = gp + r * C, *xi = xp + r * C;
    float* di = dp + r * C;
    int64_t i = 0;
    float dot = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= C; i += 8)
      acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(gi + i), _mm256_loadu_ps(w.data() + i)),
                            _mm256_loadu_ps(xi + i), acc);
    dot = hsum(acc);
#endif
    for (; i < C; ++i) dot += gi[i] * w[i] * xi[i];
    const float inv = rp[r], k = inv * inv * inv * dot / C;
    for (i = 0; i < C; ++i) di[i] = inv * gi[i] * w[i] - k * xi[i];
  });
  return dx;
}

at::Tensor gated_act_fwd(const at::Tensor& a, const at::Tensor& b, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, "act must be 0 (silu), 1 (gelu tanh) or 2 (gelu erf)");
  check_float_cpu(a, "a");
  check_float_cpu(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes(), "a and b must have the same shape");
  const int64_t H = a.size(-1), R = rows_of(a, H);
  at::Tensor y = at::empty_like(a);
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows(R, H, [&](int64_t r) {
    const float *ai = ap + r * H, *bi = bp + r * H;
    float* yi = yp + r * H;
    int64_t i = 0;
#ifdef __AVX2__
    if (act != 2)
      for (; i + 8 <= H; i += 8)
        _mm256_storeu_ps(yi + i, _mm256_mul_ps(act8(act, _mm256_loadu_ps(ai + i), nullptr), _mm256_loadu_ps(bi + i)));
#endif
    for (; i < H; ++i) yi[i] = act1(act, ai[i], nullptr) * bi[i];
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> gated_act_bwd(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b,
                                                 int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, "act must be 0 (silu), 1 (gelu tanh) or 2 (gelu erf)");
  check_float_cpu(g, "grad");
  check_float_cpu(a, "a");
  check_float_cpu(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && g.sizes() == a.sizes(), "grad, a and b must have the same shape");
  const int64_t H = a.size(-1), R = rows_of(a, H);
  at::Tensor da = at::empty_like(a), db = at::empty_like(b);
  const float *gp = g.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float *dap = da.data_ptr<float>(), *dbp = db.data_ptr<float>();
  for_rows(R, H, [&](int64_t r) {
    const int64_t o = r * H;
    int64_t i = 0;
#ifdef __AVX2__
    if (act != 2)
      for (; i + 8 <= H; i += 8) {
        __m256 d;
        const __m256 gi = _mm256_loadu_ps(gp + o + i);
        const __m256 y = act8(act, _mm256_loadu_ps(ap + o + i), &d);
        _mm256_storeu_ps(dap + o + i, _mm256_mul_ps(_mm256_mul_ps(gi, _mm256_loadu_ps(bp + o + i)), d));
        _mm256_storeu_ps(dbp + o + i, _mm256_mul_ps(gi, y));
      }
#endif
    for (; i < H; ++i) {
      float d;
      const float y = act1(act, ap[o + i], &d);
      dap[o + i] = gp[o + i] * bp[o + i] * d;
      dbp[o + i] = gp[o + i] * y;
    }
  });
  return {da, db};
}

// x (B, T, n*hs) with a contiguous last dim and evenly spaced rows (a column slice of a fused projection is
// fine) -> (B, n, T, hs) contiguous; channels [0, rd) of each head rotated by NeoX half-split pairs
// (i, i + rd/2) with cos, sin (T, rd); rd = 0: the transpose alone.
at::Tensor rope_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t n, int64_t hs) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 3 && x.size(2) == n * hs && x.stride(2) == 1 && x.stride(0) == x.size(1) * x.stride(1),
              "x must be (B, T, n*hs) with a contiguous last dim and evenly spaced rows");
  const int64_t B = x.size(0), T = x.size(1), row = x.stride(1);
  const int64_t rd = cos.numel() ? cos.size(-1) : 0;
  if (rd) {
    check_float_cpu(cos, "cos");
    check_float_cpu(sin, "sin");
    TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && sin.sizes() == cos.sizes() && rd <= hs && rd % 2 == 0,
                "cos and sin must be (T, rd) with an even rd <= hs");
  }
  at::Tensor out = at::empty({B, n, T, hs}, x.options());
  const float* xp = x.data_ptr<float>();
  const float *cp = rd ? cos.data_ptr<float>() : nullptr, *sp = rd ? sin.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t half = rd / 2;
  for_rows(B * T, n * hs, [&](int64_t bt) {  // one token: all its heads
    const int64_t b = bt / T, t = bt % T;
    const float* xt = xp + bt * row;
    const float *c = cp + t * rd, *s = sp + t * rd;
    for (int64_t h = 0; h < n; ++h) {
      const float* xi = xt + h * hs;
      float* oi = op + ((b * n + h) * T + t) * hs;
      for (int64_t i = 0; i < half; ++i) {
        oi[i] = xi[i] * c[i] - xi[i + half] * s[i];
        oi[i + half] = xi[i + half] * c[i + half] + xi[i] * s[i + half];
      }
      for (int64_t i = rd; i < hs; ++i) oi[i] = xi[i];
    }
  });
  return out;
}

// g (B, n, T, hs) -> (B, T, n*hs): the adjoint of rope_heads (each pair rotated back).
at::Tensor rope_heads_bwd(const at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin) {
  check_float_cpu(g, "grad");
  TORCH_CHECK(g.dim() == 4, "grad must be (B, n, T, hs)");
  const int64_t B = g.size(0), n = g.size(1), T = g.size(2), hs = g.size(3);
  const int64_t rd = cos.numel() ? cos.size(-1) : 0;
  if (rd) {
    check_float_cpu(cos, "cos");
    check_float_cpu(sin, "sin");
    TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && sin.sizes() == cos.sizes() && rd <= hs,
                "cos and sin must be (T, rd) with rd <= hs");
  }
  at::Tensor out = at::empty({B, T, n * hs}, g.options());
  const float* gp = g.data_ptr<float>();
  const float *cp = rd ? cos.data_ptr<float>() : nullptr, *sp = rd ? sin.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t half = rd / 2;
  for_rows(B * T, n * hs, [&](int64_t bt) {
    const int64_t b = bt / T, t = bt % T;
    float* ot = op + bt * n * hs;
    const float *c = cp + t * rd, *s = sp + t * rd;
    for (int64_t h = 0; h < n; ++h) {
      const float* gi = gp + ((b * n + h) * T + t) * hs;
      float* oi = ot + h * hs;
      for (int64_t i = 0; i < half; ++i) {
        oi[i] = gi[i] * c[i] + gi[i + half] * s[i + half];
        oi[i + half] = gi[i + half] * c[i + half] - gi[i] * s[i];
      }
      for (int64_t i = rd; i < hs; ++i) oi[i] = gi[i];
    }
  });
  return out;
}

// z (N, V) float32 logits (in place), targets (N,) int64 in [0, V), softcap <= 0: none -> CE per row (N,);
// z becomes d CE_i / d z_i: softmax(zc) - onehot, times 1 - tanh^2 when zc = softcap * tanh(z / softcap).
at::Tensor softmax_xent_(at::Tensor& z, const at::Tensor& targets, double softcap) {
  check_float_cpu(z, "logits");
  TORCH_CHECK(z.dim() == 2, "logits must be (N, V)");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.is_contiguous() &&
                  targets.numel() == z.size(0),
              "targets must be a contiguous int64 CPU tensor of one id per row");
  const int64_t N = z.size(0), V = z.size(1);
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r) TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "target ", tp[r], " is outside [0, ", V, ")");
  at::Tensor loss = at::empty({N}, z.options());
  float *zp = z.data_ptr<float>(), *lp = loss.data_ptr<float>();
  const float cap = static_cast<float>(softcap), inv_cap = cap > 0 ? 1.f / cap : 0.f;
  for_rows(N, V, [&](int64_t r) {
    float* zi = zp + r * V;
    const int64_t t = tp[r];
    // pass 1: cap (in place) and the row's max
    float top = -std::numeric_limits<float>::infinity();
    int64_t i = 0;
#ifdef __AVX2__
    __m256 vtop = _mm256_set1_ps(top);
    const __m256 vcap = _mm256_set1_ps(cap), vinv = _mm256_set1_ps(inv_cap), one = _mm256_set1_ps(1.f);
    for (; i + 8 <= V; i += 8) {
      __m256 v = _mm256_loadu_ps(zi + i);
      if (cap > 0) {  // cap * tanh(v / cap), tanh(u) = 2 sigmoid(2u) - 1
        const __m256 u = _mm256_mul_ps(v, vinv);
        v = _mm256_mul_ps(vcap, _mm256_fmsub_ps(_mm256_set1_ps(2.f), sigmoid8(_mm256_add_ps(u, u)), one));
        _mm256_storeu_ps(zi + i, v);
      }
      vtop = _mm256_max_ps(vtop, v);
    }
    top = hmax(vtop);
#endif
    for (; i < V; ++i) {
      if (cap > 0) zi[i] = cap * std::tanh(zi[i] * inv_cap);
      top = std::max(top, zi[i]);
    }
    const float picked = zi[t];
    // pass 2: exp(z - max), kept in place when no cap needs z again, and its sum
    float sum = 0.f;
    i = 0;
#ifdef __AVX2__
    __m256 vsum = _mm256_setzero_ps();
    vtop = _mm256_set1_ps(top);
    for (; i + 8 <= V; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(zi + i), vtop));
      if (cap <= 0) _mm256_storeu_ps(zi + i, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    sum = hsum(vsum);
#endif
    for (; i < V; ++i) {
      const float e = std::exp(zi[i] - top);
      if (cap <= 0) zi[i] = e;
      sum += e;
    }
    lp[r] = top + std::log(sum) - picked;
    // pass 3: softmax - onehot (times the cap's 1 - tanh^2, tanh = z / cap)
    const float inv_sum = 1.f / sum;
    i = 0;
#ifdef __AVX2__
    const __m256 vis = _mm256_set1_ps(inv_sum);
    for (; i + 8 <= V; i += 8) {
      const __m256 v = _mm256_loadu_ps(zi + i);
      if (cap > 0) {
        const __m256 th = _mm256_mul_ps(v, vinv);
        const __m256 p = _mm256_mul_ps(exp8(_mm256_sub_ps(v, vtop)), vis);
        _mm256_storeu_ps(zi + i, _mm256_mul_ps(p, _mm256_fnmadd_ps(th, th, one)));
      } else {
        _mm256_storeu_ps(zi + i, _mm256_mul_ps(v, vis));
      }
    }
#endif
    for (; i < V; ++i) {
      if (cap > 0) {
        const float th = zi[i] * inv_cap;
        zi[i] = std::exp(zi[i] - top) * inv_sum * (1.f - th * th);
      } else {
        zi[i] *= inv_sum;
      }
    }
    if (cap > 0) {
      const float th = picked * inv_cap;
      zi[t] -= 1.f - th * th;
    } else {
      zi[t] -= 1.f;
    }
  });
  return loss;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto release = [] { return py::call_guard<py::gil_scoped_release>(); };
  m.def("rms_norm_fwd", &rms_norm_fwd, "RMS norm of float32 rows and each row's 1 / rms", release());
  m.def("rms_norm_bwd", &rms_norm_bwd, "gradient of rms_norm_fwd with respect to x", release());
  m.def("gated_act_fwd", &gated_act_fwd, "act(a) * b (SwiGLU / GeGLU)", release());
  m.def("gated_act_bwd", &gated_act_bwd, "gradients of act(a) * b with respect to a and b", release());
  m.def("rope_heads", &rope_heads, "(B, T, n*hs) -> (B, n, T, hs) with RoPE", release());
  m.def("rope_heads_bwd", &rope_heads_bwd, "the adjoint of rope_heads", release());
  m.def("softmax_xent_", &softmax_xent_, "cross-entropy per row; the logits become its gradient", release());
}
