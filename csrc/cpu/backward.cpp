// The sparse backward passes: decoder, encoder, and the two together (coder_backward).
//
// Everything that sums over the selections of one latent is done in ONE pass over the CSR
// transpose of the indices (built once per call), one latent per task, in a fixed order:
//   grad_acts_dec[p] = round(W_dec[i]) . grad_y[t]      (the W_dec row is read once per latent)
//   grad_W_dec[i]    = sum_p w(acts[p]) * grad_y[t]
//   grad_z[p]        = STE(grad_acts[p] + grad_acts_dec[p], grad_values[p], values[p])
//   grad_W_enc[i]    = sum_p grad_z[p] * x[t],   grad_b_enc[i] = sum_p grad_z[p]
// for the selections p = t * k + j of latent i. grad_x then needs grad_z of every slot of a token,
// so it is a second, per-token pass: grad_x[t] = sum_j grad_z[t,j] * round(W_enc[idx[t,j]]).
// No atomics: every output element is written by one task, so results are bitwise reproducible.
#include "common.h"

#include <algorithm>
#include <cmath>

namespace binsparse_cpu {
namespace {

// d(act)/d(value) of reference.ste_factor applied. Modes: 0 relu, 1 sigmoid, 2 rectangle, 3 identity.
inline float grad_z(float ga, float gv, float v, int64_t mode, float t) {
  switch (mode) {
    case 0: return (ga + gv) * (v > 0.f ? 1.f : 0.f);
    case 1: {
      const float s = 1.f / (1.f + std::exp(-(v / t)));
      return ga * (s * (1.f - s)) + gv;
    }
    case 2: return ga * (std::fabs(v / t) < 0.5f ? 1.f : 0.f) + gv;
    default: return ga * 1.f + gv;
  }
}

// What one latent pass reads and writes; a null output is not computed.
struct Pass {
  int64_t N = 0, k = 0, M = 0;
  const int64_t* idx = nullptr;
  // decoder side
  const float* g = nullptr;      // grad_y, fp32 [N, d_out]
  int64_t d_out = 0;
  const float* acts = nullptr;   // fp32 [N*k], the decode weights
  bool binary = false;
  float* grad_W_dec = nullptr;   // [M, d_out]
  float* grad_acts = nullptr;    // [N*k]: the decoder's grad_acts alone (decode_backward)
  bool need_dot = false;         // W_dec[i] . g[t] is needed (grad_acts or grad_z)
  // encoder side
  const float* ga_in = nullptr;  // grad_acts from outside, fp32 [N*k] (null: zero)
  const float* gv = nullptr;     // grad_values, fp32 [N*k]
  const float* values = nullptr; // fp32 [N*k]
  int64_t mode = 0;
  float temperature = 1.f;
  float* gz = nullptr;           // grad_z out [N*k]
  const float* x = nullptr;      // fp32 [N, d_in]
  int64_t d_in = 0;
  float* grad_W_enc = nullptr;   // [M, d_in]
  float* grad_b_enc = nullptr;   // [M]
};

// C: the decoder's compute dtype (W_dec rows are rounded to it), W: W_dec's storage type.
template <typename C, typename W>
void latent_pass(const Pass& a, const W* W_dec) {
  const LatentBuckets buckets = bucket_by_latent(a.idx, a.N * a.k, a.M);
  const int64_t k = a.k;
  parallel_over_latents(buckets, a.M, [&](int64_t i) {
    thread_local std::vector<float> buf;
    const float* wrow = nullptr;
    if (a.need_dot) {
      buf.resize(a.d_out);
      wrow = row_as_float<C>(W_dec + i * a.d_out, a.d_out, buf.data());
    }
    float* out_dec = a.grad_W_dec ? a.grad_W_dec + i * a.d_out : nullptr;
    float* out_enc = a.grad_W_enc ? a.grad_W_enc + i * a.d_in : nullptr;
    if (out_dec) std::fill(out_dec, out_dec + a.d_out, 0.f);
    if (out_enc) std::fill(out_enc, out_enc + a.d_in, 0.f);
    float bias = 0.f;
    for (int64_t q = buckets.offsets[i]; q < buckets.offsets[i + 1]; ++q) {
      const int64_t p = buckets.order[q];
      const int64_t t = p / k;
      const float* gt = a.g ? a.g + t * a.d_out : nullptr;
      const float dot = a.need_dot ? vec_dot(wrow, gt, a.d_out) : 0.f;
      if (a.grad_acts) a.grad_acts[p] = dot;
      if (out_dec) {
        if (a.binary) {
          if (a.acts[p] != 0.f) vec_add(gt, out_dec, a.d_out);
        } else {
          vec_axpy(a.acts[p], gt, out_dec, a.d_out);
        }
      }
      if (a.gz) {
        const float ga = (a.ga_in ? a.ga_in[p] : 0.f) + dot;
        const float z = grad_z(ga, a.gv[p], a.values[p], a.mode, a.temperature);
        a.gz[p] = z;
        if (out_enc) vec_axpy(z, a.x + t * a.d_in, out_enc, a.d_in);
        bias += z;
      }
    }
    if (a.grad_b_enc) a.grad_b_enc[i] = bias;
  });
}

template <typename C, typename W>
void grad_x_kernel(const float* gz, const int64_t* idx, const W* Wp, float* gx, int64_t N, int64_t k, int64_t d) {
  at::parallel_for(0, N, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(d);
    for (int64_t t = t0; t < t1; ++t) {
      float* out = gx + t * d;
      std::fill(out, out + d, 0.f);
      for (int64_t j = 0; j < k; ++j)
        vec_axpy(gz[t * k + j], row_as_float<C>(Wp + idx[t * k + j] * d, d, buf.data()), out, d);
    }
  });
}

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_mode(int64_t mode, double temperature) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "mode must be 0 (relu), 1 (sigmoid), 2 (rectangle) or 3 (identity), got ", mode);
  TORCH_CHECK(!(mode == 1 || mode == 2) || (temperature > 0 && std::isfinite(temperature)),
              "temperature must be a positive finite number, got ", temperature);
}

void run_pass(const Pass& a, const Tensor& W_dec, at::ScalarType dec_compute) {
  if (!a.need_dot) {  // W_dec is not read
    latent_pass<float, float>(a, nullptr);
    return;
  }
  dispatch_float(W_dec.scalar_type(), "W_dec", [&](auto w_tag) {
    using W_t = decltype(w_tag);
    dispatch_float(dec_compute, "acts", [&](auto c_tag) {
      latent_pass<decltype(c_tag), W_t>(a, W_dec.data_ptr<W_t>());
    });
  });
}

Tensor grad_x(const Tensor& gz, const Tensor& indices, const Tensor& W_enc_in, at::ScalarType x_compute, int64_t N,
              int64_t k) {
  const Tensor W = W_enc_in.contiguous();
  const int64_t d = W.size(1);
  Tensor gx = at::empty({N, d}, gz.options());
  dispatch_float(W.scalar_type(), "W_enc", [&](auto w_tag) {
    using W_t = decltype(w_tag);
    dispatch_float(x_compute, "x", [&](auto c_tag) {
      grad_x_kernel<decltype(c_tag), W_t>(gz.data_ptr<float>(), indices.data_ptr<int64_t>(), W.data_ptr<W_t>(),
                                           gx.data_ptr<float>(), N, k, d);
    });
  });
  return gx;
}

}  // namespace

std::tuple<Tensor, Tensor> decode_backward(const Tensor& grad_y, const Tensor& indices_in, const Tensor& acts_in,
                                           const Tensor& W_in, bool binary, bool need_acts, bool need_W) {
  check_index(indices_in, "indices");
  check_float(acts_in, "acts");
  check_float(W_in, "W_dec");
  check_float(grad_y, "grad_y");
  check_ndim(indices_in, "indices", 2);
  check_ndim(W_in, "W_dec", 2);
  check_shape(acts_in, "acts", indices_in.sizes());
  const int64_t N = indices_in.size(0), k = indices_in.size(1), M = W_in.size(0), d = W_in.size(1);
  check_shape(grad_y, "grad_y", {N, d});
  const Tensor indices = indices_in.contiguous();
  check_indices_in_range(indices, M, "indices");
  const auto opts = grad_y.options().dtype(at::kFloat);
  Tensor grad_acts = need_acts ? at::empty({N, k}, opts) : at::empty({0}, opts);
  Tensor grad_W = need_W ? at::empty({M, d}, opts) : at::empty({0}, opts);
  if (!need_acts && !need_W) return {grad_acts, grad_W};
  const Tensor g = f32(grad_y), acts = f32(acts_in), W = W_in.contiguous();
  Pass a;
  a.N = N, a.k = k, a.M = M, a.idx = indices.data_ptr<int64_t>();
  a.g = g.data_ptr<float>(), a.d_out = d, a.acts = acts.data_ptr<float>(), a.binary = binary;
  a.grad_W_dec = need_W ? grad_W.data_ptr<float>() : nullptr;
  a.grad_acts = need_acts ? grad_acts.data_ptr<float>() : nullptr;
  a.need_dot = need_acts;
  run_pass(a, W, acts_in.scalar_type());
  return {grad_acts, grad_W};
}

std::tuple<Tensor, Tensor, Tensor> encode_backward(const Tensor& grad_acts, const Tensor& grad_values,
                                                   const Tensor& values, const Tensor& x_in, const Tensor& W_in,
                                                   const Tensor& indices_in, int64_t mode, double temperature,
                                                   bool need_x, bool need_W, bool need_b) {
  auto [gx, gW, gb, gWd] = coder_backward(Tensor(), grad_acts, grad_values, indices_in, Tensor(), values, x_in, W_in,
                                          Tensor(), false, mode, temperature, need_x, need_W, need_b, false);
  return {gx, gW, gb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> coder_backward(
    const Tensor& grad_y_in, const Tensor& grad_acts_in, const Tensor& grad_values_in, const Tensor& indices_in,
    const Tensor& acts_in, const Tensor& values_in, const Tensor& x_in, const Tensor& W_enc_in,
    const Tensor& W_dec_in, bool binary, int64_t mode, double temperature, bool need_x, bool need_W_enc,
    bool need_b_enc, bool need_W_dec) {
  // W_dec undefined: the encoder's backward alone (encode_backward).
  const bool has_dec = W_dec_in.defined();
  check_index(indices_in, "indices");
  check_ndim(indices_in, "indices", 2);
  check_float(grad_acts_in, "grad_acts");
  check_float(grad_values_in, "grad_values");
  check_float(values_in, "values");
  check_float(x_in, "x");
  check_float(W_enc_in, "W_enc");
  check_ndim(x_in, "x", 2);
  check_ndim(W_enc_in, "W_enc", 2);
  const int64_t N = x_in.size(0), d_in = x_in.size(1), M = W_enc_in.size(0), k = indices_in.size(1);
  check_shape(W_enc_in, "W_enc", {M, d_in});
  check_shape(indices_in, "indices", {N, k});
  check_shape(values_in, "values", {N, k});
  check_shape(grad_acts_in, "grad_acts", {N, k});
  check_shape(grad_values_in, "grad_values", {N, k});
  check_mode(mode, temperature);
  int64_t d_out = 0;
  if (has_dec) {
    check_float(W_dec_in, "W_dec");
    check_ndim(W_dec_in, "W_dec", 2);
    check_shape(W_dec_in, "W_dec", {M, W_dec_in.size(1)});
    d_out = W_dec_in.size(1);
    check_float(grad_y_in, "grad_y");
    check_shape(grad_y_in, "grad_y", {N, d_out});
    check_float(acts_in, "acts");
    check_shape(acts_in, "acts", {N, k});
  }
  const Tensor indices = indices_in.contiguous();
  check_indices_in_range(indices, M, "indices");
  const auto opts = x_in.options().dtype(at::kFloat);
  const bool need_enc = need_x || need_W_enc || need_b_enc;
  Tensor gx = at::empty({0}, opts), gWe = at::empty({0}, opts), gbe = at::empty({0}, opts), gWd = at::empty({0}, opts);
  need_W_dec = need_W_dec && has_dec;
  if (!need_enc && !need_W_dec) return {gx, gWe, gbe, gWd};

  const Tensor ga = f32(grad_acts_in), gv = f32(grad_values_in), v = f32(values_in);
  Tensor g, acts, x, gz = at::empty({N, k}, opts);
  if (need_W_enc) {
    x = f32(x_in);
    gWe = at::empty({M, d_in}, opts);
  }
  if (need_b_enc) gbe = at::empty({M}, opts);
  if (need_W_dec) gWd = at::empty({M, d_out}, opts);
  Pass a;
  a.N = N, a.k = k, a.M = M, a.idx = indices.data_ptr<int64_t>();
  if (has_dec && (need_enc || need_W_dec)) {
    g = f32(grad_y_in);
    a.g = g.data_ptr<float>(), a.d_out = d_out;
    a.need_dot = need_enc;  // the decoder's grad_acts feeds grad_z
    if (need_W_dec) {
      acts = f32(acts_in);
      a.acts = acts.data_ptr<float>(), a.binary = binary, a.grad_W_dec = gWd.data_ptr<float>();
    }
  }
  if (need_enc) {
    a.ga_in = ga.data_ptr<float>(), a.gv = gv.data_ptr<float>(), a.values = v.data_ptr<float>();
    a.mode = mode, a.temperature = static_cast<float>(temperature), a.gz = gz.data_ptr<float>();
    if (need_W_enc) a.x = x.data_ptr<float>(), a.d_in = d_in, a.grad_W_enc = gWe.data_ptr<float>();
    if (need_b_enc) a.grad_b_enc = gbe.data_ptr<float>();
  }
  run_pass(a, W_dec_in.defined() ? W_dec_in.contiguous() : W_dec_in, acts_in.defined() ? acts_in.scalar_type() : at::kFloat);
  if (need_x) gx = grad_x(gz, indices, W_enc_in, x_in.scalar_type(), N, k);
  return {gx, gWe, gbe, gWd};
}

}  // namespace binsparse_cpu
