// Decoder forward: gather-sum of the selected W_dec rows (the backward is in backward.cpp).
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

}  // namespace binsparse_cpu
