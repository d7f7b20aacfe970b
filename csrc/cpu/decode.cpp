// Decoder: gather-sum of the selected W_dec rows (forward) and its sparse backward.
#include "common.h"

#include <algorithm>

namespace binsparse_cpu {
namespace {

void check_codes(const Tensor& indices, const Tensor& acts) {
  check_index(indices, "indices");
  check_float(acts, "acts");
  check_ndim(indices, "indices", 2);
  check_shape(acts, "acts", indices.sizes());
}

// y[t] = b + sum_j act[t,j] * W[idx[t,j]], fp32 accumulators; binary codes add the rows whose
// act is nonzero, with no multiplications.
template <typename C, typename W, bool Binary>
void decode_kernel(const int64_t* idx, const C* acts, const W* Wp, const float* bias, C* y, int64_t N, int64_t k,
                   int64_t d) {
  at::parallel_for(0, N, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(d), buf(d);
    for (int64_t t = t0; t < t1; ++t) {
      float* out;
      if constexpr (std::is_same_v<C, float>) out = y + t * d;
      else out = acc.data();
      std::fill(out, out + d, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float a = static_cast<float>(acts[t * k + j]);
        if constexpr (Binary) {
          if (a != 0.f) vec_add(row_as_float<C>(Wp + idx[t * k + j] * d, d, buf.data()), out, d);
        } else {
          vec_axpy(a, row_as_float<C>(Wp + idx[t * k + j] * d, d, buf.data()), out, d);
        }
      }
      if (bias != nullptr) vec_add(bias, out, d);
      if constexpr (!std::is_same_v<C, float>)
        for (int64_t c = 0; c < d; ++c) y[t * d + c] = static_cast<C>(out[c]);
    }
  });
}

// grad_acts[t,j] = W[idx[t,j]] . g[t] (W rounded to the compute dtype C).
template <typename C, typename W>
void grad_acts_kernel(const int64_t* idx, const W* Wp, const float* g, float* ga, int64_t N, int64_t k, int64_t d) {
  at::parallel_for(0, N, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(d);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < k; ++j)
        ga[t * k + j] = vec_dot(row_as_float<C>(Wp + idx[t * k + j] * d, d, buf.data()), g + t * d, d);
  });
}

}  // namespace

Tensor decode_forward(const Tensor& indices_in, const Tensor& acts_in, const Tensor& W_in,
                      const std::optional<Tensor>& b_dec, bool binary) {
  check_codes(indices_in, acts_in);
  check_float(W_in, "W_dec");
  check_ndim(W_in, "W_dec", 2);
  const int64_t N = indices_in.size(0), k = indices_in.size(1), M = W_in.size(0), d = W_in.size(1);
  Tensor bias;
  if (b_dec.has_value()) {
    check_float(*b_dec, "b_dec");
    check_shape(*b_dec, "b_dec", {d});
    bias = b_dec->to(at::kFloat).contiguous();
  }
  const Tensor indices = indices_in.contiguous(), acts = acts_in.contiguous(), W = W_in.contiguous();
  check_indices_in_range(indices, M, "indices");
  Tensor y = at::empty({N, d}, acts.options());
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  dispatch_float(W.scalar_type(), "W_dec", [&](auto w_tag) {
    using W_t = decltype(w_tag);
    dispatch_float(acts.scalar_type(), "acts", [&](auto c_tag) {
      using C_t = decltype(c_tag);
      auto kernel = binary ? decode_kernel<C_t, W_t, true> : decode_kernel<C_t, W_t, false>;
      kernel(indices.data_ptr<int64_t>(), acts.data_ptr<C_t>(), W.data_ptr<W_t>(), bp, y.data_ptr<C_t>(), N, k, d);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> decode_backward(const Tensor& grad_y, const Tensor& indices_in, const Tensor& acts_in,
                                           const Tensor& W_in, bool binary, bool need_acts, bool need_W) {
  check_codes(indices_in, acts_in);
  check_float(W_in, "W_dec");
  check_float(grad_y, "grad_y");
  check_ndim(W_in, "W_dec", 2);
  const int64_t N = indices_in.size(0), k = indices_in.size(1), M = W_in.size(0), d = W_in.size(1);
  check_shape(grad_y, "grad_y", {N, d});
  const Tensor indices = indices_in.contiguous();
  check_indices_in_range(indices, M, "indices");
  const Tensor g = grad_y.to(at::kFloat).contiguous();
  const auto f32 = g.options();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const float* gp = g.data_ptr<float>();

  Tensor grad_acts = at::empty({0}, f32), grad_W = at::empty({0}, f32);
  if (need_acts) {
    grad_acts = at::empty({N, k}, f32);
    const Tensor W = W_in.contiguous();
    dispatch_float(W.scalar_type(), "W_dec", [&](auto w_tag) {
      using W_t = decltype(w_tag);
      dispatch_float(acts_in.scalar_type(), "acts", [&](auto c_tag) {
        using C_t = decltype(c_tag);
        grad_acts_kernel<C_t, W_t>(idx, W.data_ptr<W_t>(), gp, grad_acts.data_ptr<float>(), N, k, d);
      });
    });
  }
  if (need_W) {
    // grad_W[i] = sum of act * g[t] over the selections of latent i (binary: sum of g[t] where
    // act != 0), one latent row per task in a fixed order.
    grad_W = at::empty({M, d}, f32);
    const Tensor a = acts_in.to(at::kFloat).contiguous();
    const float* ap = a.data_ptr<float>();
    float* gWp = grad_W.data_ptr<float>();
    const LatentBuckets buckets = bucket_by_latent(idx, N * k, M);
    parallel_over_latents(buckets, M, [&](int64_t i) {
      float* out = gWp + i * d;
      std::fill(out, out + d, 0.f);
      for (int64_t q = buckets.offsets[i]; q < buckets.offsets[i + 1]; ++q) {
        const int64_t p = buckets.order[q];
        if (binary) {
          if (ap[p] != 0.f) vec_add(gp + (p / k) * d, out, d);
        } else {
          vec_axpy(ap[p], gp + (p / k) * d, out, d);
        }
      }
    });
  }
  return {grad_acts, grad_W};
}

}  // namespace binsparse_cpu
