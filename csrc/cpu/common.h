// Shared helpers for the CPU kernels: argument checks, dtype dispatch, weight rounding, small
// float vector kernels and the stable CSR transpose used by the weight gradients.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace binsparse_cpu {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Argument checks. Every op checks its arguments itself, so a bad call through torch.ops raises
// a RuntimeError naming the problem instead of reading out of bounds.
// ---------------------------------------------------------------------------------------------

inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got a tensor on ", t.device());
}

inline void check_float(const Tensor& t, const char* name) {
  check_cpu(t, name);
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", s);
}

inline void check_index(const Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
}

inline void check_ndim(const Tensor& t, const char* name, int64_t ndim) {
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got shape ", t.sizes());
}

inline void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

// Every index in [0, M): checked once per call so the gathers below never leave W.
void check_indices_in_range(const Tensor& indices, int64_t M, const char* name);

// ---------------------------------------------------------------------------------------------
// Dtype dispatch over the three supported float types. `f` receives a value of the C++ type.
// ---------------------------------------------------------------------------------------------

template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

void round_to_bf16(const float* src, float* dst, int64_t n);  // dst = float(bfloat16(src)), vectorized

// A weight row rounded to the compute dtype C and widened to float, as `w.to(C).float()` does.
// Without rounding to do (float weights, float compute) the row is used in place.
template <typename C, typename W>
inline const float* row_as_float(const W* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<W, float> && std::is_same_v<C, float>) {
    return src;
  } else if constexpr (std::is_same_v<W, float> && std::is_same_v<C, c10::BFloat16>) {
    round_to_bf16(src, buf, n);  // the autocast case: fp32 master weights, bf16 activations
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(static_cast<C>(src[i]));
    return buf;
  }
}

// ---------------------------------------------------------------------------------------------
// Float vector kernels (compiled for AVX-512 / AVX2 / baseline, picked at load time).
// ---------------------------------------------------------------------------------------------

void vec_axpy(float a, const float* x, float* y, int64_t n);  // y += a * x
void vec_add(const float* x, float* y, int64_t n);            // y += x
float vec_dot(const float* a, const float* b, int64_t n);      // sum a * b, fp32
void vec_score_binary(float* s, const float* b, const float* t, int64_t n);  // s = (s + b) - t
void vec_score_relu(float* s, const float* b, int64_t n);                    // s = max(s + b, 0)
int64_t first_candidate(const float* s, int64_t n, float thr);  // first i with !(s[i] <= thr), else n

// ---------------------------------------------------------------------------------------------
// Stable CSR transpose of an [N, k] index matrix: the (token, slot) positions grouped by latent,
// in increasing position order inside each latent. Used to compute weight gradients one latent
// row at a time, with no atomics and a fixed summation order.
// ---------------------------------------------------------------------------------------------

struct LatentBuckets {
  std::vector<int64_t> offsets;  // [M + 1]: bucket i is order[offsets[i] .. offsets[i+1])
  std::vector<int64_t> order;    // [N * k]: flat positions t * k + j
};

LatentBuckets bucket_by_latent(const int64_t* indices, int64_t count, int64_t M);

// Calls fn(i) for every latent i in [0, M), in parallel, with the latents split into ranges of
// similar work (bucket size + 1 per latent, so empty latents still cost their row write).
template <typename F>
void parallel_over_latents(const LatentBuckets& b, int64_t M, F&& fn) {
  const int64_t total = static_cast<int64_t>(b.order.size()) + M;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(M, 8 * at::get_num_threads()));
  std::vector<int64_t> start(parts + 1);
  // cost prefix at latent i is offsets[i] + i (monotonic): find each part's first latent.
  int64_t i = 0;
  for (int64_t p = 0; p <= parts; ++p) {
    const int64_t target = total * p / parts;
    while (i < M && b.offsets[i] + i < target) ++i;
    start[p] = p == parts ? M : i;
  }
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t lat = start[p]; lat < start[p + 1]; ++lat) fn(lat);
  });
}

// The ops (registered in ops.cpp).
std::tuple<Tensor, Tensor> encode_forward(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc,
                                          const std::optional<Tensor>& threshold, int64_t k, bool binary);
std::tuple<Tensor, Tensor, Tensor> encode_backward(const Tensor& grad_acts, const Tensor& grad_values,
                                                   const Tensor& values, const Tensor& x, const Tensor& W_enc,
                                                   const Tensor& indices, int64_t mode, double temperature,
                                                   bool need_x, bool need_W, bool need_b);
Tensor decode_forward(const Tensor& indices, const Tensor& acts, const Tensor& W_dec,
                      const std::optional<Tensor>& b_dec, bool binary);
std::tuple<Tensor, Tensor> decode_backward(const Tensor& grad_y, const Tensor& indices, const Tensor& acts,
                                           const Tensor& W_dec, bool binary, bool need_acts, bool need_W);
std::tuple<Tensor, Tensor, Tensor, Tensor> coder_backward(
    const Tensor& grad_y, const Tensor& grad_acts, const Tensor& grad_values, const Tensor& indices,
    const Tensor& acts, const Tensor& values, const Tensor& x, const Tensor& W_enc, const Tensor& W_dec, bool binary,
    int64_t mode, double temperature, bool need_x, bool need_W_enc, bool need_b_enc, bool need_W_dec);

}  // namespace binsparse_cpu
