#include "common.h"

#include <algorithm>
#include <cstring>

namespace binsparse_cpu {

// The extension is built for the baseline x86-64 ISA so that one wheel runs everywhere; the hot
// float loops get AVX-512 and AVX2 clones as well, and the loader picks the best one for the CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BINSPARSE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BINSPARSE_MULTIVERSION
#endif

void check_indices_in_range(const Tensor& indices, int64_t M, const char* name) {
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t n = indices.numel();
  for (int64_t p = 0; p < n; ++p) {
    // One unsigned compare catches negative indices too.
    TORCH_CHECK(static_cast<uint64_t>(idx[p]) < static_cast<uint64_t>(M), name, " must lie in [0, ", M,
                "), found ", idx[p]);
  }
}

BINSPARSE_MULTIVERSION
void vec_axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

BINSPARSE_MULTIVERSION
void vec_add(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

BINSPARSE_MULTIVERSION
float vec_dot(const float* a, const float* b, int64_t n) {
  // 64 independent partial sums: the compiler maps them onto several vector registers, which
  // both vectorizes the reduction (no reassociation needed) and hides the add latency.
  constexpr int L = 64;
  float acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) acc[l] += a[i + l] * b[i + l];
  // Fold the partial sums pairwise (vectorized) instead of 64 dependent scalar adds.
  for (int w = L / 2; w >= 8; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

BINSPARSE_MULTIVERSION
void round_to_bf16(const float* src, float* dst, int64_t n) {
  // Round to nearest even on the upper 16 bits, NaN to the canonical quiet NaN: the same result
  // as c10::BFloat16(float), written so that the compiler vectorizes it.
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    r = src[i] != src[i] ? 0x7fc00000u : r;
    std::memcpy(dst + i, &r, 4);
  }
}

BINSPARSE_MULTIVERSION
void vec_score_binary(float* s, const float* b, const float* t, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = (s[i] + b[i]) - t[i];
}

BINSPARSE_MULTIVERSION
void vec_score_relu(float* s, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = std::max(s[i] + b[i], 0.f);
}

BINSPARSE_MULTIVERSION
int64_t first_candidate(const float* s, int64_t n, float thr) {
  // Blocks of 32 are tested with a branch-free (vectorized) any-of; only a block that holds a
  // candidate is searched element by element. Most blocks of a top-k scan hold none.
  // !(s <= thr) is s > thr, or s is NaN.
  constexpr int B = 32;
  int64_t i = 0;
  for (; i + B <= n; i += B) {
    int any = 0;
    for (int l = 0; l < B; ++l) any |= !(s[i + l] <= thr);
    if (any) break;
  }
  for (; i < n; ++i)
    if (!(s[i] <= thr)) return i;
  return n;
}

LatentBuckets bucket_by_latent(const int64_t* indices, int64_t count, int64_t M) {
  LatentBuckets b;
  b.offsets.assign(M + 1, 0);
  b.order.resize(count);
  for (int64_t p = 0; p < count; ++p) ++b.offsets[indices[p] + 1];
  for (int64_t i = 0; i < M; ++i) b.offsets[i + 1] += b.offsets[i];
  std::vector<int64_t> cursor(b.offsets.begin(), b.offsets.end() - 1);
  for (int64_t p = 0; p < count; ++p) b.order[cursor[indices[p]]++] = p;
  return b;
}

}  // namespace binsparse_cpu
