// The O(N k d) kernels: decode (gather-sum), its backward, and the encoder's backward.
//
// * gather_rows: out[t] = sum_j a[t,j] * round(W[idx[t,j]]) (+ bias), fp32 accumulation, 8 columns
//   per thread with 16-byte loads where aligned. Binary codes add the rows whose act is nonzero,
//   with no multiplication, and skip the others. Also computes grad_x = grad_z @ W_enc[idx].
// * Everything that sums over the selections of a latent goes through the CSR transpose of the
//   indices (a stable sort by latent, so deterministic), built once per backward call:
//   - bucket_dot: the decoder's grad_acts[p] = round(W_dec[i]) . g[t] for the selections p = t*k+j
//     of latent i (one W_dec row per CTA instead of one gathered row per selection), optionally
//     fused with the STE into grad_z;
//   - bucket_rows: grad_W[i] = sum over the selections of latent i of w[p] * rows[t] (grad_W_dec
//     from acts and grad_y, grad_W_enc from grad_z and x, grad_b_enc = sum of grad_z).
//   Buckets are cut into segments of kSegment selections, so a latent firing on half the tokens
//   is spread over many CTAs; multi-segment latents are summed in segment order by a second
//   kernel. No atomics: every output is written once, and results are bitwise reproducible.
// * coder_backward: the backward of an encode followed by the decode of its codes, in one call
//   (one transpose for the decoder's and the encoder's gradients).
#include "common.cuh"

#include <atomic>

namespace binsparse_cuda {

// Set while Python's binsparse_kernels.deferred_checks() is active: the range check would read
// the answer on the host (a device sync), so it is left to the deferred checks of the Python
// layer. Process-global, not thread-local: autograd runs CUDA backwards on its own threads.
static std::atomic<bool> g_deferred_checks{false};

void set_deferred_checks(bool deferred) { g_deferred_checks.store(deferred); }

void check_indices_in_range(const Tensor& indices, int64_t M, const char* name) {
  const char* env = std::getenv("BINSPARSE_CHECK_VALUES");
  if ((env != nullptr && std::strcmp(env, "0") == 0) || indices.numel() == 0 || g_deferred_checks.load()) return;
  auto mm = at::aminmax(indices);
  const Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
  const int64_t lo = both[0].item<int64_t>(), hi = both[1].item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < M, name, " must lie in [0, ", M, "), got values in [", lo, ", ", hi, "]");
}

namespace {

constexpr int64_t kSegment = 256;  // selections per CTA in the weight-gradient buckets

// blockDim.x threads cover 8 columns each; blockDim.y tokens per block.
template <typename A, typename W>
__global__ void gather_rows_kernel(const int64_t* __restrict__ idx, const A* __restrict__ acts,
                                   const W* __restrict__ Wm, const float* __restrict__ bias, A* __restrict__ out,
                                   int64_t N, int k, int64_t d, int64_t M, int round, bool binary, bool vec) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * 8;
  if (t >= N || c0 >= d) return;
  const int n = static_cast<int>((d - c0 < 8 ? d - c0 : 8));
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < k; ++j) {
    const int64_t i = idx[t * k + j];
    const float a = to_f(acts[t * k + j]);
    if (i < 0 || i >= M || (binary && a == 0.f)) continue;  // out-of-range: rejected on the host
    float w[8];
    load8(Wm + i * d + c0, w, vec, n);
    if (binary) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += round_to(w[e], round);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = fmaf(a, round_to(w[e], round), acc[e]);
    }
  }
  if (bias != nullptr) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += e < n ? bias[c0 + e] : 0.f;
  }
  store8(out + t * d + c0, acc, vec, n);
}

// d(act)/d(value) applied: grad_z = STE'(values) * grad_acts + grad_values (mode 0, ReLU:
// (grad_acts + grad_values) * 1[v > 0]). IEEE division (no fast math), as the reference.
__device__ __forceinline__ float ste_grad(float ga, float gv, float z, int mode, float temperature) {
  if (mode == 0) return z > 0.f ? ga + gv : 0.f;
  float f = 1.f;
  if (mode == 1) {
    const float s = 1.f / (1.f + expf(-z / temperature));
    f = s * (1.f - s);  // no 1/T factor: the reference trainer's convention
  } else if (mode == 2) {
    f = fabsf(z / temperature) < 0.5f ? 1.f : 0.f;
  }
  return ga * f + gv;
}

// The latent i of bucket segment s: seg_off[i] <= s < seg_off[i + 1].
__device__ __forceinline__ int64_t segment_latent(const int64_t* __restrict__ seg_off, int64_t M, int64_t s) {
  int64_t lo = 0, hi = M;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (seg_off[mid] <= s) lo = mid; else hi = mid;
  }
  return lo;
}

// Bucket boundaries of the sorted keys: offsets[i] = first position whose key >= i, i in [0, M].
__global__ void bucket_bounds_kernel(const int* __restrict__ keys, int64_t NK, int64_t M, int64_t* __restrict__ offsets) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i > M) return;
  int64_t lo = 0, hi = NK;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < i) lo = mid + 1; else hi = mid;
  }
  offsets[i] = lo;
}

// The decoder's grad_acts per latent: one CTA per bucket segment (blockIdx.x, an upper bound of
// their count: spare CTAs exit), one warp per selection p of the segment at a time:
// dot = round(W[i]) . g[p / k] (the CTA's warps share the one W row, from L1). Writes dot to
// ga_out[p] and/or grad_z[p] = STE(ga_in[p] + dot, gv[p], v[p]).
template <typename G, typename W>
__global__ void bucket_dot_kernel(const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                                  const int64_t* __restrict__ seg_off, const G* __restrict__ g,
                                  const W* __restrict__ Wm, int64_t M, int k, int64_t d, int round, bool vec,
                                  float* __restrict__ ga_out, const float* __restrict__ ga_in,
                                  const float* __restrict__ gv, const float* __restrict__ v, int mode,
                                  float temperature, float* __restrict__ gz) {
  const int64_t s = blockIdx.x;
  if (s >= seg_off[M]) return;
  const int64_t i = segment_latent(seg_off, M, s);
  const int64_t local = s - seg_off[i];
  const int64_t start = offsets[i] + local * kSegment;
  const int64_t end = (offsets[i + 1] < start + kSegment ? offsets[i + 1] : start + kSegment);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t e = start + warp; e < end; e += warps) {
    const int64_t p = perm[e];
    const int64_t t = p / k;
    float sum = 0.f;
    for (int64_t c0 = int64_t(lane) * 8; c0 < d; c0 += 256) {
      const int n = static_cast<int>((d - c0 < 8 ? d - c0 : 8));
      float w[8], gr[8];
      load8(Wm + i * d + c0, w, vec, n);
      load8(g + t * d + c0, gr, vec, n);
#pragma unroll
      for (int q = 0; q < 8; ++q) sum = fmaf(round_to(w[q], round), gr[q], sum);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
    if (lane == 0) {
      if (ga_out != nullptr) ga_out[p] = sum;
      if (gz != nullptr) gz[p] = ste_grad(ga_in[p] + sum, gv[p], v[p], mode, temperature);
    }
  }
}

// Stage 1: one CTA per segment s (blockIdx.x, an upper bound of their count: spare CTAs exit),
// blockIdx.y over column blocks. Single-segment latents (including empty ones, which get zeros)
// are written straight into grad; the segments of larger buckets go to `scratch` rows.
template <typename R>
__global__ void bucket_rows_kernel(const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                                   const int64_t* __restrict__ seg_off, const int64_t* __restrict__ multi_off,
                                   const float* __restrict__ wts, const R* __restrict__ rows, int64_t M, int k,
                                   int64_t d, bool plain, bool vec, float* __restrict__ grad,
                                   float* __restrict__ scratch, float* __restrict__ grad_b,
                                   float* __restrict__ scratch_b) {
  const int64_t s = blockIdx.x;
  if (s >= seg_off[M]) return;
  const int64_t i = segment_latent(seg_off, M, s);
  const int64_t local = s - seg_off[i];
  const bool single = seg_off[i + 1] - seg_off[i] == 1;
  const int64_t start = offsets[i] + local * kSegment;
  const int64_t end = (offsets[i + 1] < start + kSegment ? offsets[i + 1] : start + kSegment);
  const int64_t out_row = single ? i : multi_off[i] + local;

  if (rows != nullptr) {
    const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * 8;
    if (c0 < d) {
      const int n = static_cast<int>((d - c0 < 8 ? d - c0 : 8));
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int64_t e = start; e < end; ++e) {
        const int64_t p = perm[e];
        const float w = wts[p];
        if (plain && w == 0.f) continue;
        float r[8];
        load8(rows + (p / k) * d + c0, r, vec, n);
        if (plain) {
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[q] += r[q];
        } else {
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[q] = fmaf(w, r[q], acc[q]);
        }
      }
      store8((single ? grad : scratch) + out_row * d + c0, acc, vec, n);
    }
  }
  if (grad_b != nullptr && blockIdx.y == 0 && threadIdx.x < 32) {
    float sum = 0.f;
    for (int64_t e = start + threadIdx.x; e < end; e += 32) sum += wts[perm[e]];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
    if (threadIdx.x == 0) (single ? grad_b : scratch_b)[out_row] = sum;
  }
}

// Stage 2: latents with several segments sum their scratch rows in segment order.
__global__ void bucket_reduce_kernel(const int64_t* __restrict__ seg_off, const int64_t* __restrict__ multi_off,
                                     const float* __restrict__ scratch, const float* __restrict__ scratch_b,
                                     int64_t d, float* __restrict__ grad, float* __restrict__ grad_b) {
  const int64_t i = blockIdx.x;
  const int64_t nseg = seg_off[i + 1] - seg_off[i];
  if (nseg <= 1) return;
  const int64_t first = multi_off[i];
  if (grad != nullptr) {
    for (int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; c < d; c += int64_t(gridDim.y) * blockDim.x) {
      float acc = 0.f;
      for (int64_t l = 0; l < nseg; ++l) acc += scratch[(first + l) * d + c];
      grad[i * d + c] = acc;
    }
  }
  if (grad_b != nullptr && blockIdx.y == 0 && threadIdx.x == 0) {
    float acc = 0.f;
    for (int64_t l = 0; l < nseg; ++l) acc += scratch_b[first + l];
    grad_b[i] = acc;
  }
}

// grad_z of every selection (the encoder's backward alone, no decoder in the call).
__global__ void ste_kernel(const float* __restrict__ ga, const float* __restrict__ gv, const float* __restrict__ v,
                           int64_t n, int mode, float temperature, float* __restrict__ gz) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= n) return;
  gz[p] = ste_grad(ga[p], gv[p], v[p], mode, temperature);
}

// Launches gather_rows<A, W>: out = acts-weighted sum of rounded W rows (+ bias).
void launch_gather(const Tensor& idx, const Tensor& acts, const Tensor& W, const Tensor& bias, const Tensor& out,
                   int round, bool binary) {
  const int64_t N = idx.size(0), k = idx.size(1), d = W.size(1), M = W.size(0);
  if (N == 0 || d == 0) return;
  const int tx = row_threads(d);
  const int ty = std::max(1, 256 / tx);
  const dim3 grid(unsigned((N + ty - 1) / ty), unsigned(((d + 7) / 8 + tx - 1) / tx));
  TORCH_CHECK((N + ty - 1) / ty < (int64_t(1) << 31), "too many rows (", N, ")");
  const bool vec = d % 8 == 0 && aligned16(W) && aligned16(out);
  auto stream = current_stream();
  dispatch_float(acts.scalar_type(), "gather", [&](auto a) {
    using TA = decltype(a);
    dispatch_float(W.scalar_type(), "gather", [&](auto w) {
      using TW = decltype(w);
      gather_rows_kernel<TA, TW><<<grid, dim3(tx, ty), 0, stream>>>(
          ptr<const int64_t>(idx), ptr<const TA>(acts), ptr<const TW>(W),
          bias.defined() ? ptr<const float>(bias) : nullptr, ptr<TA>(out), N, int(k), d, M, round, binary, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The CSR transpose of `indices` by latent plus the segment layout of the buckets.
struct Buckets {
  Tensor perm, offsets, seg_off, multi_off;
  int64_t max_segments = 0, scratch_rows = 0;
};

Buckets make_buckets(const Tensor& indices, int64_t M) {
  Buckets b;
  const int64_t NK = indices.numel();
  // Stable radix sort (a counting sort per digit) on int32 keys: deterministic, half the passes of int64.
  auto sorted = at::sort(indices.reshape({-1}).to(at::kInt), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor keys = std::get<0>(sorted).contiguous();
  b.perm = std::get<1>(sorted).contiguous();
  b.offsets = at::empty({M + 1}, indices.options().dtype(at::kLong));
  auto stream = current_stream();
  bucket_bounds_kernel<<<unsigned((M + 1 + 255) / 256), 256, 0, stream>>>(ptr<const int>(keys), NK, M,
                                                                          ptr<int64_t>(b.offsets));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const Tensor counts = b.offsets.narrow(0, 1, M) - b.offsets.narrow(0, 0, M);
  const Tensor nseg = ((counts + (kSegment - 1)).div(kSegment, "floor")).clamp_min(1);
  b.seg_off = at::cat({at::zeros({1}, nseg.options()), at::cumsum(nseg, 0)});
  const Tensor multi = at::where(nseg > 1, nseg, at::zeros_like(nseg));
  b.multi_off = (at::cumsum(multi, 0) - multi).contiguous();
  // Bounds known without a device sync: each latent has >= 1 segment and at most one partial one;
  // a multi-segment latent has > kSegment selections, so it has at most 2 * count / kSegment segments.
  b.max_segments = M + NK / kSegment;
  b.scratch_rows = 2 * NK / kSegment + 1;
  return b;
}

// grad[i] = sum over latent i's selections p of wts[p] * rows[p / k] (rows may be undefined), and
// grad_b[i] = sum of wts[p] (grad_b may be undefined). Both float32, every row written once.
void launch_buckets(const Buckets& b, const Tensor& wts, const Tensor& rows, int64_t k, bool plain, const Tensor& grad,
                    const Tensor& grad_b) {
  const int64_t M = b.offsets.size(0) - 1;
  if (M == 0) return;
  const int64_t d = rows.defined() ? rows.size(1) : 0;
  const bool want_rows = rows.defined() && d > 0;
  const int tx = want_rows ? row_threads(d) : 32;
  const unsigned col_blocks = want_rows ? unsigned(((d + 7) / 8 + tx - 1) / tx) : 1;
  TORCH_CHECK(b.max_segments < (int64_t(1) << 31), "too many selections for the weight gradients");
  Tensor scratch = at::empty({want_rows ? b.scratch_rows : 0, std::max<int64_t>(d, 1)}, wts.options());
  Tensor scratch_b = at::empty({b.scratch_rows}, wts.options());
  const bool vec = want_rows && d % 8 == 0 && aligned16(rows) && aligned16(grad) && aligned16(scratch);
  auto stream = current_stream();
  const at::ScalarType rt = rows.defined() ? rows.scalar_type() : at::kFloat;
  dispatch_float(rt, "weight gradient", [&](auto r) {
    using TR = decltype(r);
    bucket_rows_kernel<TR><<<dim3(unsigned(b.max_segments), col_blocks), tx, 0, stream>>>(
        ptr<const int64_t>(b.perm), ptr<const int64_t>(b.offsets), ptr<const int64_t>(b.seg_off),
        ptr<const int64_t>(b.multi_off), ptr<const float>(wts), want_rows ? ptr<const TR>(rows) : nullptr, M,
        int(k), d, plain, vec, want_rows ? ptr<float>(grad) : nullptr, ptr<float>(scratch),
        grad_b.defined() ? ptr<float>(grad_b) : nullptr, ptr<float>(scratch_b));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const unsigned red_cols = want_rows ? unsigned(std::min<int64_t>((d + 255) / 256, 16)) : 1;
  TORCH_CHECK(M < (int64_t(1) << 31), "too many latents");
  bucket_reduce_kernel<<<dim3(unsigned(M), red_cols), 256, 0, stream>>>(
      ptr<const int64_t>(b.seg_off), ptr<const int64_t>(b.multi_off), ptr<const float>(scratch),
      ptr<const float>(scratch_b), d, want_rows ? ptr<float>(grad) : nullptr,
      grad_b.defined() ? ptr<float>(grad_b) : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches bucket_dot over the segments of `b`: ga_out[p] = round(W[i]) . g[p / k] where ga_out is
// defined, and grad_z[p] = STE(ga_in[p] + that dot, gv[p], v[p]) where gz is defined (ga_in, gv, v fp32).
void launch_bucket_dot(const Buckets& b, const Tensor& g, const Tensor& W, int64_t k, int round, const Tensor& ga_out,
                       const Tensor& ga_in, const Tensor& gv, const Tensor& v, int64_t mode, double temperature,
                       const Tensor& gz) {
  const int64_t M = b.offsets.size(0) - 1, d = W.size(1);
  if (M == 0) return;
  TORCH_CHECK(b.max_segments < (int64_t(1) << 31), "too many selections for the weight gradients");
  const bool vec = d % 8 == 0 && aligned16(W) && aligned16(g);
  const bool want_gz = gz.defined();
  auto stream = current_stream();
  dispatch_float(g.scalar_type(), "bucket_dot", [&](auto gt) {
    using TG = decltype(gt);
    dispatch_float(W.scalar_type(), "bucket_dot", [&](auto wt) {
      using TW = decltype(wt);
      bucket_dot_kernel<TG, TW><<<unsigned(b.max_segments), 256, 0, stream>>>(
          ptr<const int64_t>(b.perm), ptr<const int64_t>(b.offsets), ptr<const int64_t>(b.seg_off), ptr<const TG>(g),
          ptr<const TW>(W), M, int(k), d, round, vec, ga_out.defined() ? ptr<float>(ga_out) : nullptr,
          want_gz ? ptr<const float>(ga_in) : nullptr, want_gz ? ptr<const float>(gv) : nullptr,
          want_gz ? ptr<const float>(v) : nullptr, int(mode), float(temperature),
          want_gz ? ptr<float>(gz) : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void check_codes(const Tensor& indices, const Tensor& acts, const char* acts_name, const Tensor& like) {
  check_cuda(indices, "indices", like);
  check_cuda(acts, acts_name, like);
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  check_ndim(indices, "indices", 2);
  check_shape(acts, acts_name, indices.sizes());
}

}  // namespace

Tensor decode_forward(const Tensor& indices, const Tensor& acts, const Tensor& W_dec, const std::optional<Tensor>& b_dec,
                      bool binary) {
  check_codes(indices, acts, "acts", acts);
  check_float(acts, "acts");
  check_cuda(W_dec, "W_dec", acts);
  check_float(W_dec, "W_dec");
  check_ndim(W_dec, "W_dec", 2);
  const int64_t N = indices.size(0), M = W_dec.size(0), d = W_dec.size(1);
  Tensor bias;
  if (b_dec.has_value() && b_dec->defined()) {
    check_cuda(*b_dec, "b_dec", acts);
    check_float(*b_dec, "b_dec");
    check_shape(*b_dec, "b_dec", {d});
    bias = b_dec->to(at::kFloat).contiguous();
  }
  const c10::cuda::CUDAGuard guard(acts.device());
  check_indices_in_range(indices, M, "indices");
  Tensor out = at::empty({N, d}, acts.options());
  launch_gather(indices, acts, W_dec, bias, out, round_mode(W_dec.scalar_type(), acts.scalar_type()), binary);
  return out;
}

std::tuple<Tensor, Tensor> decode_backward(const Tensor& grad_y_in, const Tensor& indices, const Tensor& acts,
                                           const Tensor& W_dec, bool binary, bool need_acts, bool need_W) {
  check_codes(indices, acts, "acts", acts);
  check_float(acts, "acts");
  check_cuda(W_dec, "W_dec", acts);
  check_float(W_dec, "W_dec");
  check_ndim(W_dec, "W_dec", 2);
  check_cuda(grad_y_in, "grad_y", acts, /*contiguous=*/false);
  check_float(grad_y_in, "grad_y");
  const int64_t N = indices.size(0), k = indices.size(1), M = W_dec.size(0), d = W_dec.size(1);
  check_shape(grad_y_in, "grad_y", {N, d});
  const c10::cuda::CUDAGuard guard(acts.device());
  const Tensor grad_y = grad_y_in.contiguous();
  const auto f32 = acts.options().dtype(at::kFloat);
  Tensor grad_acts = at::empty({0}, f32), grad_W = at::empty({0}, f32);
  if (!need_acts && !need_W) return {grad_acts, grad_W};
  check_indices_in_range(indices, M, "indices");
  const Buckets b = make_buckets(indices, M);  // one transpose for both gradients
  if (need_acts) {
    grad_acts = at::empty({N, k}, f32);
    launch_bucket_dot(b, grad_y, W_dec, k, round_mode(W_dec.scalar_type(), acts.scalar_type()), grad_acts, Tensor(),
                      Tensor(), Tensor(), 0, 1.0, Tensor());
  }
  if (need_W) {
    grad_W = at::empty({M, d}, f32);
    if (d > 0) launch_buckets(b, acts.to(at::kFloat).contiguous(), grad_y, k, binary, grad_W, Tensor());
  }
  return {grad_acts, grad_W};
}

std::tuple<Tensor, Tensor, Tensor> encode_backward(const Tensor& grad_acts, const Tensor& grad_values,
                                                   const Tensor& values, const Tensor& x, const Tensor& W_enc,
                                                   const Tensor& indices, int64_t mode, double temperature,
                                                   bool need_x, bool need_W, bool need_b) {
  check_codes(indices, values, "values", x);
  check_cuda(x, "x", x);
  check_float(x, "x");
  check_ndim(x, "x", 2);
  check_cuda(W_enc, "W_enc", x);
  check_float(W_enc, "W_enc");
  check_ndim(W_enc, "W_enc", 2);
  TORCH_CHECK(values.scalar_type() == at::kFloat, "values must be float32, got ", values.scalar_type());
  check_cuda(grad_acts, "grad_acts", x, /*contiguous=*/false);
  check_cuda(grad_values, "grad_values", x, /*contiguous=*/false);
  check_float(grad_acts, "grad_acts");
  check_float(grad_values, "grad_values");
  check_shape(grad_acts, "grad_acts", indices.sizes());
  check_shape(grad_values, "grad_values", indices.sizes());
  const int64_t N = indices.size(0), k = indices.size(1), M = W_enc.size(0), d = W_enc.size(1);
  check_shape(x, "x", {N, d});
  TORCH_CHECK(mode >= 0 && mode <= 3, "mode must be 0 (relu), 1 (sigmoid), 2 (rectangle) or 3 (identity), got ", mode);
  TORCH_CHECK(temperature > 0, "temperature must be positive, got ", temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor gx = at::empty({0}, f32), gW = at::empty({0}, f32), gb = at::empty({0}, f32);
  if (!need_x && !need_W && !need_b) return {gx, gW, gb};
  check_indices_in_range(indices, M, "indices");

  const int64_t NK = N * k;
  Tensor grad_z = at::empty({N, k}, f32);
  if (NK > 0) {
    const Tensor ga = grad_acts.to(at::kFloat).contiguous(), gv = grad_values.to(at::kFloat).contiguous();
    ste_kernel<<<unsigned((NK + 255) / 256), 256, 0, current_stream()>>>(
        ptr<const float>(ga), ptr<const float>(gv), ptr<const float>(values), NK, int(mode), float(temperature),
        ptr<float>(grad_z));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (need_x) {
    gx = at::empty({N, d}, f32);
    launch_gather(indices, grad_z, W_enc, Tensor(), gx, round_mode(W_enc.scalar_type(), x.scalar_type()), false);
  }
  if (need_W || need_b) {
    if (need_W) gW = at::empty({M, d}, f32);
    if (need_b) gb = at::empty({M}, f32);
    const Buckets b = make_buckets(indices, M);
    launch_buckets(b, grad_z, need_W ? x : Tensor(), k, false, gW, need_b ? gb : Tensor());
  }
  return {gx, gW, gb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> coder_backward(
    const Tensor& grad_y_in, const Tensor& grad_acts, const Tensor& grad_values, const Tensor& indices,
    const Tensor& acts, const Tensor& values, const Tensor& x, const Tensor& W_enc, const Tensor& W_dec, bool binary,
    int64_t mode, double temperature, bool need_x, bool need_W_enc, bool need_b_enc, bool need_W_dec) {
  check_codes(indices, values, "values", x);
  check_codes(indices, acts, "acts", x);
  check_float(acts, "acts");
  check_cuda(x, "x", x);
  check_float(x, "x");
  check_ndim(x, "x", 2);
  check_cuda(W_enc, "W_enc", x);
  check_float(W_enc, "W_enc");
  check_ndim(W_enc, "W_enc", 2);
  check_cuda(W_dec, "W_dec", x);
  check_float(W_dec, "W_dec");
  check_ndim(W_dec, "W_dec", 2);
  TORCH_CHECK(values.scalar_type() == at::kFloat, "values must be float32, got ", values.scalar_type());
  check_cuda(grad_y_in, "grad_y", x, /*contiguous=*/false);
  check_cuda(grad_acts, "grad_acts", x, /*contiguous=*/false);
  check_cuda(grad_values, "grad_values", x, /*contiguous=*/false);
  check_float(grad_y_in, "grad_y");
  check_float(grad_acts, "grad_acts");
  check_float(grad_values, "grad_values");
  check_shape(grad_acts, "grad_acts", indices.sizes());
  check_shape(grad_values, "grad_values", indices.sizes());
  const int64_t N = indices.size(0), k = indices.size(1), M = W_enc.size(0), d_in = W_enc.size(1);
  const int64_t d_out = W_dec.size(1);
  check_shape(x, "x", {N, d_in});
  check_shape(W_dec, "W_dec", {M, d_out});
  check_shape(grad_y_in, "grad_y", {N, d_out});
  TORCH_CHECK(mode >= 0 && mode <= 3, "mode must be 0 (relu), 1 (sigmoid), 2 (rectangle) or 3 (identity), got ", mode);
  TORCH_CHECK(temperature > 0, "temperature must be positive, got ", temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor gx = at::empty({0}, f32), gWe = at::empty({0}, f32), gbe = at::empty({0}, f32), gWd = at::empty({0}, f32);
  const bool need_enc = need_x || need_W_enc || need_b_enc;
  if (!need_enc && !need_W_dec) return {gx, gWe, gbe, gWd};
  check_indices_in_range(indices, M, "indices");

  const Tensor grad_y = grad_y_in.contiguous();
  const Buckets b = make_buckets(indices, M);  // one transpose for every gradient below
  Tensor grad_z;
  if (need_enc) {
    // the decoder's grad_acts, latent by latent, fused with the STE: grad_z, each selection once
    grad_z = at::empty({N, k}, f32);
    launch_bucket_dot(b, grad_y, W_dec, k, round_mode(W_dec.scalar_type(), acts.scalar_type()), Tensor(),
                      grad_acts.to(at::kFloat).contiguous(), grad_values.to(at::kFloat).contiguous(), values, mode,
                      temperature, grad_z);
  }
  if (need_W_dec) {
    gWd = at::empty({M, d_out}, f32);
    if (d_out > 0) launch_buckets(b, acts.to(at::kFloat).contiguous(), grad_y, k, binary, gWd, Tensor());
  }
  if (need_W_enc || need_b_enc) {
    if (need_W_enc) gWe = at::empty({M, d_in}, f32);
    if (need_b_enc) gbe = at::empty({M}, f32);
    launch_buckets(b, grad_z, need_W_enc ? x : Tensor(), k, false, gWe, need_b_enc ? gbe : Tensor());
  }
  if (need_x) {
    gx = at::empty({N, d_in}, f32);
    launch_gather(indices, grad_z, W_enc, Tensor(), gx, round_mode(W_enc.scalar_type(), x.scalar_type()), false);
  }
  return {gx, gWe, gbe, gWd};
}

}  // namespace binsparse_cuda
