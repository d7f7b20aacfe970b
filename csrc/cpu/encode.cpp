// Encoder forward: chunked GEMM + exact per-row top-k (the backward is in backward.cpp).
#include "common.h"

#include <algorithm>
#include <cmath>

namespace binsparse_cpu {
namespace {

// Latents per GEMM chunk, and the most scores held at once (rows per block = kScratch / chunk).
constexpr int64_t kChunk = 4096;
constexpr int64_t kScratch = int64_t(1) << 22;  // 16 MiB of fp32 scores

// The running top-k of a row is a binary min-heap on (value, -index): the root is the entry that
// the next better score replaces. Among equal values the lowest index is kept. NaN ranks above
// every number, as in torch.topk, which also keeps the order total (std::sort needs that).
inline bool worse(float va, int64_t ia, float vb, int64_t ib) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na || nb) return nb && (!na || ia > ib);
  return va < vb || (va == vb && ia > ib);
}

void sift_down(float* v, int64_t* ix, int64_t k, int64_t pos) {
  const float pv = v[pos];
  const int64_t pi = ix[pos];
  while (true) {
    int64_t child = 2 * pos + 1;
    if (child >= k) break;
    if (child + 1 < k && worse(v[child + 1], ix[child + 1], v[child], ix[child])) ++child;
    if (!worse(v[child], ix[child], pv, pi)) break;
    v[pos] = v[child];
    ix[pos] = ix[child];
    pos = child;
  }
  v[pos] = pv;
  ix[pos] = pi;
}

// Merges scores s[0..n) of latents col0..col0+n into a row's running top-k (v, ix). Columns
// arrive in increasing order, so the first k fill the heap and later ones enter only when they
// beat the root: an equal value has a larger index and loses the tie. A cheap vectorized scan
// finds the candidates (s > root, or NaN); `worse` decides.
void merge_row(const float* s, int64_t n, int64_t col0, float* v, int64_t* ix, int64_t k) {
  int64_t j = 0;
  for (; j < n && col0 + j < k; ++j) {
    v[col0 + j] = s[j];
    ix[col0 + j] = col0 + j;
    if (col0 + j == k - 1)
      for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(v, ix, k, p);
  }
  while (j < n) {
    j += first_candidate(s + j, n - j, v[0]);
    if (j == n) break;
    if (worse(v[0], ix[0], s[j], col0 + j)) {
      v[0] = s[j];
      ix[0] = col0 + j;
      sift_down(v, ix, k, 0);
    }
    ++j;
  }
}

// Final order of a row: values descending, ties by increasing index (any order is valid; a
// fixed one makes the output reproducible).
void sort_row(float* v, int64_t* ix, int64_t k, std::vector<std::pair<float, int64_t>>& tmp) {
  tmp.resize(k);
  for (int64_t j = 0; j < k; ++j) tmp[j] = {v[j], ix[j]};
  std::sort(tmp.begin(), tmp.end(), [](const auto& a, const auto& b) { return worse(b.first, b.second, a.first, a.second); });
  for (int64_t j = 0; j < k; ++j) {
    v[j] = tmp[j].first;
    ix[j] = tmp[j].second;
  }
}

}  // namespace

std::tuple<Tensor, Tensor> encode_forward(const Tensor& x_in, const Tensor& W_in, const Tensor& b_in,
                                          const std::optional<Tensor>& threshold, int64_t k, bool binary) {
  check_float(x_in, "x");
  check_float(W_in, "W_enc");
  check_float(b_in, "b_enc");
  check_ndim(x_in, "x", 2);
  check_ndim(W_in, "W_enc", 2);
  const int64_t N = x_in.size(0), d = x_in.size(1), M = W_in.size(0);
  check_shape(W_in, "W_enc", {M, d});
  check_shape(b_in, "b_enc", {M});
  TORCH_CHECK(k >= 1 && k <= M, "k must be in [1, ", M, "] (the number of latents), got ", k);
  TORCH_CHECK(binary == threshold.has_value(),
              binary ? "binary encode needs a threshold" : "continuous encode takes no threshold");
  Tensor t_f;
  if (binary) {
    check_float(*threshold, "threshold");
    check_shape(*threshold, "threshold", {M});
    t_f = threshold->to(at::kFloat).contiguous();
  }

  const auto compute = x_in.scalar_type();
  const Tensor x = x_in.to(at::kFloat).contiguous();
  const Tensor W = W_in.contiguous();
  const Tensor b_f = b_in.to(at::kFloat).contiguous();
  Tensor values = at::empty({N, k}, x.options());
  Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {values, indices};

  const int64_t chunk = std::min(M, kChunk);
  const int64_t rows = std::min(N, std::max<int64_t>(1, kScratch / chunk));
  Tensor scratch = at::empty({rows * chunk}, x.options());
  float* vals = values.data_ptr<float>();
  int64_t* ixs = indices.data_ptr<int64_t>();
  const float* bp = b_f.data_ptr<float>();
  const float* tp = binary ? t_f.data_ptr<float>() : nullptr;

  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t cw = std::min(chunk, M - c0);
    // Weights rounded to the compute dtype, then fp32 for the GEMM (a no-op for fp32 weights).
    const Tensor Wc = W.narrow(0, c0, cw).to(compute).to(at::kFloat);
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t rw = std::min(rows, N - r0);
      Tensor S = scratch.narrow(0, 0, rw * cw).view({rw, cw});
      at::mm_out(S, x.narrow(0, r0, rw), Wc.t());
      float* sp = S.data_ptr<float>();
      at::parallel_for(0, rw, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float* s = sp + i * cw;
          // Same two roundings as the reference: pre = acc + b, then pre - theta or ReLU(pre).
          if (binary) vec_score_binary(s, bp + c0, tp + c0, cw);
          else vec_score_relu(s, bp + c0, cw);
          merge_row(s, cw, c0, vals + (r0 + i) * k, ixs + (r0 + i) * k, k);
        }
      });
    }
  }
  at::parallel_for(0, N, 64, [&](int64_t t0, int64_t t1) {
    std::vector<std::pair<float, int64_t>> tmp;
    for (int64_t t = t0; t < t1; ++t) sort_row(vals + t * k, ixs + t * k, k, tmp);
  });
  return {values, indices};
}

}  // namespace binsparse_cpu
