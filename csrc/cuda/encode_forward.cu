// Fused encoder: pre = x @ W_enc^T + b_enc, then z = pre - theta (binary) or ReLU(pre)
// (continuous), then an exact per-row top-k, without ever writing the [N, M] pre-activations.
//
// Grid: (row block of BM tokens) x (latent chunk). Each CTA runs a GEMM tile loop over its chunk,
// BN latents at a time: tensor cores (nvcuda::wmma, mma.sync, fp32 accumulate) for bf16/fp16 and
// SIMT FMAs for fp32 (fp32 math, as the reference). The accumulator tile goes to shared memory and
// the epilogue adds the bias, subtracts theta or applies ReLU, and offers every value to its row's
// running top-k (warp_offer in common.cuh: only values beating the row's current k-th are inserted).
// Each CTA writes an exact partial top-k per row; a small merge kernel then combines the chunks in
// a fixed order. k > kMaxFusedK uses a chunked at::matmul + stable sort fallback.
#include <mma.h>

#include "common.cuh"

namespace binsparse_cuda {
namespace {

constexpr int BM = 64;    // tokens per CTA
constexpr int BN = 128;   // latents per tile
constexpr int BK = 32;    // reduction step
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int LDC = BN + 4;  // fp32 accumulator tile row stride (floats)
constexpr int kMaxFusedK = 128;

template <typename T>
struct Cfg {
  static constexpr int kStages = sizeof(T) == 2 ? 3 : 2;
  static constexpr int LD = sizeof(T) == 2 ? BK + 8 : BK + 4;  // padded smem row (elements), 16 B multiple
  static constexpr int kVec = 16 / sizeof(T);                    // elements per 16-byte copy
  static constexpr size_t kStageElems = size_t(BM + BN) * LD;
  static constexpr size_t kPipeBytes = kStages * kStageElems * sizeof(T);
  static constexpr size_t kTileBytes = size_t(BM) * LDC * sizeof(float);
  static constexpr size_t kUnionBytes = kPipeBytes > kTileBytes ? kPipeBytes : kTileBytes;
};

template <typename T>
size_t smem_bytes(int k) {
  return Cfg<T>::kUnionBytes + size_t(BM) * k * (sizeof(float) + sizeof(int)) + size_t(BM) * 3 * sizeof(int);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool in_range) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = in_range ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// One [rows x BK] slab of a row-major [nrows x d] matrix into shared memory (row stride LD),
// zero outside the matrix. `vec`: d is a multiple of the vector width and the base is aligned.
template <typename T, int ROWS>
__device__ __forceinline__ void load_slab(T* dst, const T* src, int64_t nrows, int64_t d, int64_t row0, int64_t k0,
                                          bool vec) {
  using C = Cfg<T>;
  constexpr int kPerRow = BK / C::kVec;
  for (int v = threadIdx.x; v < ROWS * kPerRow; v += kThreads) {
    const int r = v / kPerRow;
    const int c = (v % kPerRow) * C::kVec;
    const int64_t gr = row0 + r, gc = k0 + c;
    T* out = dst + r * C::LD + c;
    if (vec) {
      const bool in = gr < nrows && gc < d;
      cp_async16(out, in ? src + gr * d + gc : src, in);
    } else {
#pragma unroll
      for (int e = 0; e < C::kVec; ++e)
        out[e] = (gr < nrows && gc + e < d) ? src[gr * d + gc + e] : from_f<T>(0.f);
    }
  }
}

// acc tile [BM x BN] (fp32, stride LDC, in shared memory) = x[row0:+BM] @ W[col0:+BN]^T.
template <typename T>
__device__ void gemm_tile(const T* __restrict__ x, const T* __restrict__ W, int64_t N, int64_t M, int64_t d,
                          int64_t row0, int64_t col0, bool vec, unsigned char* pipe, float* tile) {
  using C = Cfg<T>;
  T* stages = reinterpret_cast<T*>(pipe);
  const int nk = static_cast<int>((d + BK - 1) / BK);
  auto load = [&](int kt) {
    T* sA = stages + (kt % C::kStages) * C::kStageElems;
    T* sB = sA + BM * C::LD;
    load_slab<T, BM>(sA, x, N, d, row0, int64_t(kt) * BK, vec);
    load_slab<T, BN>(sB, W, M, d, col0, int64_t(kt) * BK, vec);
  };
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < nk) load(s);
    cp_async_commit();  // committed even when empty so the group count stays uniform
  }
  const int warp = threadIdx.x / 32;

  if constexpr (sizeof(T) == 2) {
    using namespace nvcuda;
    // 8 warps as 2 (rows) x 4 (latents); each warp owns a 32 x 32 block = 2 x 2 fragments.
    const int wm = warp / 4, wn = warp % 4;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int kt = 0; kt < nk; ++kt) {
      cp_async_wait<C::kStages - 2>();
      __syncthreads();  // stage kt is visible to all; stage kt-1 is free to overwrite
      if (kt + C::kStages - 1 < nk) load(kt + C::kStages - 1);
      cp_async_commit();
      const T* sA = stages + (kt % C::kStages) * C::kStageElems;
      const T* sB = sA + BM * C::LD;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], sA + (wm * 32 + i * 16) * C::LD + kk, C::LD);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], sB + (wn * 32 + j * 16) * C::LD + kk, C::LD);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the pipeline buffers alias the accumulator tile
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(tile + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                                wmma::mem_row_major);
  } else {
    // fp32: SIMT FMAs, each thread a 4 (rows) x 8 (latents, stride 16) block.
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    for (int kt = 0; kt < nk; ++kt) {
      cp_async_wait<C::kStages - 2>();
      __syncthreads();
      if (kt + C::kStages - 1 < nk) load(kt + C::kStages - 1);
      cp_async_commit();
      const float* sA = reinterpret_cast<const float*>(stages + (kt % C::kStages) * C::kStageElems);
      const float* sB = sA + BM * C::LD;
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = sA[(ty * 4 + i) * C::LD + kk];
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = sB[(tx + 16 * j) * C::LD + kk];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) tile[(ty * 4 + i) * LDC + tx + 16 * j] = acc[i][j];
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    encode_topk_kernel(const T* __restrict__ x, const T* __restrict__ W, const float* __restrict__ b_enc,
                       const float* __restrict__ theta, int64_t N, int64_t M, int64_t d, int k, int64_t chunk_cols,
                       bool vec, float* __restrict__ part_v, int* __restrict__ part_i) {
  extern __shared__ __align__(128) unsigned char smem[];
  using C = Cfg<T>;
  float* tile = reinterpret_cast<float*>(smem);
  float* list_v = reinterpret_cast<float*>(smem + C::kUnionBytes);
  int* list_i = reinterpret_cast<int*>(list_v + BM * k);
  float* worst_v = reinterpret_cast<float*>(list_i + BM * k);
  int* worst_i = reinterpret_cast<int*>(worst_v + BM);
  int* worst_s = worst_i + BM;

  const int64_t row0 = int64_t(blockIdx.x) * BM;
  const int64_t chunk = blockIdx.y;
  const int64_t col_begin = chunk * chunk_cols;
  const int64_t col_end = min(M, col_begin + chunk_cols);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int s = threadIdx.x; s < BM * k; s += kThreads) {
    list_v[s] = -INFINITY;
    list_i[s] = kEmptyIndex;
  }
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    worst_v[r] = -INFINITY;
    worst_i[r] = kEmptyIndex;
    worst_s[r] = 0;
  }
  // (visibility of the initial lists is ensured by the barriers inside gemm_tile)

  for (int64_t col0 = col_begin; col0 < col_end; col0 += BN) {
    gemm_tile<T>(x, W, N, M, d, row0, col0, vec, smem, tile);
    // Epilogue: warp w owns rows w, w + 8, ...; each lane looks at 4 latents of the tile.
    for (int r = warp; r < BM; r += kWarps) {
      if (row0 + r >= N) break;
      float wv = worst_v[r];
      int wi = worst_i[r], ws = worst_s[r];
      float* lv = list_v + r * k;
      int* li = list_i + r * k;
#pragma unroll
      for (int q = 0; q < BN / 32; ++q) {
        const int c = lane + 32 * q;
        const int64_t col = col0 + c;
        const bool valid = col < col_end;
        float z = 0.f;
        if (valid) {
          const float pre = tile[r * LDC + c] + b_enc[col];
          z = theta != nullptr ? pre - theta[col] : (pre < 0.f ? 0.f : pre);  // ReLU that keeps NaN
        }
        warp_offer(lv, li, k, wv, wi, ws, z, static_cast<int>(col), valid);
      }
      if (lane == 0) {
        worst_v[r] = wv;
        worst_i[r] = wi;
        worst_s[r] = ws;
      }
    }
    __syncthreads();  // the next tile's loads overwrite the accumulator tile
  }

  for (int r = warp; r < BM; r += kWarps) {
    const int64_t gr = row0 + r;
    if (gr >= N) break;
    const int64_t base = (chunk * N + gr) * k;
    for (int s = lane; s < k; s += 32) {
      part_v[base + s] = list_v[r * k + s];
      part_i[base + s] = list_i[r * k + s];
    }
  }
}

// Merges the per-chunk partial top-k lists of each row (one warp per row, chunks in order) and
// writes each row sorted.
constexpr int kMergeWarps = 8;
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_topk_kernel(const float* __restrict__ part_v, const int* __restrict__ part_i, int chunks, int64_t N,
                      int k, float* __restrict__ out_v, int64_t* __restrict__ out_i) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kMergeWarps + warp;
  if (row >= N) return;  // warp-uniform; no block-wide barrier follows
  float* lv = reinterpret_cast<float*>(smem) + warp * k;
  int* li = reinterpret_cast<int*>(reinterpret_cast<float*>(smem) + kMergeWarps * k) + warp * k;
  for (int s = lane; s < k; s += 32) {
    lv[s] = part_v[row * k + s];
    li[s] = part_i[row * k + s];
  }
  __syncwarp();
  float wv;
  int wi, ws;
  warp_worst(lv, li, k, wv, wi, ws);
  __syncwarp();
  for (int c = 1; c < chunks; ++c) {
    const int64_t base = (int64_t(c) * N + row) * k;
    for (int s0 = 0; s0 < k; s0 += 32) {
      const int s = s0 + lane;
      const bool valid = s < k;
      warp_offer(lv, li, k, wv, wi, ws, valid ? part_v[base + s] : 0.f, valid ? part_i[base + s] : 0, valid);
    }
  }
  __syncwarp();
  // Write the row sorted by decreasing value: each entry goes to its rank under the total order
  // (identical entries, only possible for empty slots, are told apart by slot).
  for (int s = lane; s < k; s += 32) {
    const float v = lv[s];
    const int i = li[s];
    int rank = 0;
    for (int o = 0; o < k; ++o) rank += beats(lv[o], li[o], v, i) || (lv[o] == v && li[o] == i && o < s);
    out_v[row * k + rank] = v;
    out_i[row * k + rank] = i;
  }
}

// k beyond the fused limit: latents in chunks (never the full N x M at once), fp32 math as the
// reference, and a stable descending sort so that ties go to the lowest index.
std::tuple<Tensor, Tensor> encode_fallback(const Tensor& x, const Tensor& W, const Tensor& b, const Tensor& theta,
                                           int64_t k) {
  const int64_t N = x.size(0), M = W.size(0);
  const Tensor xf = x.to(at::kFloat);
  int64_t cols = std::max<int64_t>(k, (int64_t(1) << 24) / std::max<int64_t>(N, 1));
  cols = std::min<int64_t>(M, (cols + 127) / 128 * 128);
  Tensor run_v, run_i;
  for (int64_t c0 = 0; c0 < M; c0 += cols) {
    const int64_t n = std::min(cols, M - c0);
    Tensor pre = at::matmul(xf, W.narrow(0, c0, n).to(at::kFloat).t()) + b.narrow(0, c0, n);
    pre = theta.defined() ? pre - theta.narrow(0, c0, n) : at::relu(pre);
    auto sorted = at::sort(pre, /*stable=*/true, /*dim=*/1, /*descending=*/true);
    const int64_t take = std::min(k, n);
    Tensor v = std::get<0>(sorted).narrow(1, 0, take);
    Tensor i = std::get<1>(sorted).narrow(1, 0, take) + c0;
    if (run_v.defined()) {
      // Earlier chunks come first, so the stable sort keeps ties in ascending index order.
      v = at::cat({run_v, v}, 1);
      i = at::cat({run_i, i}, 1);
      auto merged = at::sort(v, /*stable=*/true, /*dim=*/1, /*descending=*/true);
      const int64_t keep = std::min<int64_t>(k, v.size(1));
      i = i.gather(1, std::get<1>(merged).narrow(1, 0, keep));
      v = std::get<0>(merged).narrow(1, 0, keep);
    }
    run_v = v.contiguous();
    run_i = i.contiguous();
  }
  return {run_v, run_i};
}

}  // namespace

std::tuple<Tensor, Tensor> encode_forward(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc,
                                          const std::optional<Tensor>& threshold, int64_t k, bool binary) {
  check_cuda(x, "x", x);
  check_cuda(W_enc, "W_enc", x);
  check_cuda(b_enc, "b_enc", x);
  check_float(x, "x");
  check_float(W_enc, "W_enc");
  check_float(b_enc, "b_enc");
  check_ndim(x, "x", 2);
  check_ndim(W_enc, "W_enc", 2);
  const int64_t N = x.size(0), d = x.size(1), M = W_enc.size(0);
  check_shape(W_enc, "W_enc", {M, d});
  check_shape(b_enc, "b_enc", {M});
  TORCH_CHECK(M < (int64_t(1) << 31) - 1, "W_enc has too many latents (", M, ")");
  TORCH_CHECK(k >= 1 && k <= M, "k must be in [1, ", M, "] (the number of latents), got ", k);
  Tensor theta;
  if (binary) {
    TORCH_CHECK(threshold.has_value() && threshold->defined(), "the binary encoder needs a threshold");
    theta = *threshold;
    check_cuda(theta, "threshold", x);
    check_float(theta, "threshold");
    check_shape(theta, "threshold", {M});
    theta = theta.to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK(!threshold.has_value() || !threshold->defined(), "the continuous encoder takes no threshold");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  // Weights rounded to the compute dtype once (as the reference's W.to(x.dtype)); bias in fp32.
  const Tensor W = W_enc.scalar_type() == x.scalar_type() ? W_enc : W_enc.to(x.scalar_type());
  const Tensor b = b_enc.to(at::kFloat).contiguous();

  Tensor values = at::empty({N, k}, x.options().dtype(at::kFloat));
  Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {values, indices};

  const size_t smem_optin = size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  size_t smem = 0;
  dispatch_float(x.scalar_type(), "encode_forward", [&](auto t) { smem = smem_bytes<decltype(t)>(int(std::min<int64_t>(k, kMaxFusedK))); });
  if (k > kMaxFusedK || smem > smem_optin) {
    auto out = encode_fallback(x, W, b, theta, k);
    return {std::get<0>(out), std::get<1>(out)};
  }

  // Split the latents across CTAs so that small N still fills the GPU; each chunk is a whole
  // number of BN tiles (the last one ends at M).
  const int64_t row_blocks = (N + BM - 1) / BM;
  const int64_t col_tiles = (M + BN - 1) / BN;
  const int64_t target_ctas = 2 * int64_t(sms);
  int64_t chunks = std::min<int64_t>(col_tiles, std::max<int64_t>(1, (target_ctas + row_blocks - 1) / row_blocks));
  chunks = std::min<int64_t>(chunks, 65535);
  const int64_t tiles_per_chunk = (col_tiles + chunks - 1) / chunks;
  chunks = (col_tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  TORCH_CHECK(row_blocks < (int64_t(1) << 31), "x has too many rows (", N, ")");

  Tensor part_v = at::empty({chunks, N, k}, x.options().dtype(at::kFloat));
  Tensor part_i = at::empty({chunks, N, k}, x.options().dtype(at::kInt));
  auto stream = current_stream();
  dispatch_float(x.scalar_type(), "encode_forward", [&](auto t) {
    using T = decltype(t);
    const bool vec = d % Cfg<T>::kVec == 0 && aligned16(x) && aligned16(W);
    auto kernel = encode_topk_kernel<T>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<dim3(unsigned(row_blocks), unsigned(chunks)), kThreads, smem, stream>>>(
        ptr<const T>(x), ptr<const T>(W), ptr<const float>(b), binary ? ptr<const float>(theta) : nullptr, N, M, d,
        int(k), tiles_per_chunk * BN, vec, ptr<float>(part_v), ptr<int>(part_i));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const size_t merge_smem = size_t(kMergeWarps) * k * (sizeof(float) + sizeof(int));
  merge_topk_kernel<<<unsigned((N + kMergeWarps - 1) / kMergeWarps), kMergeWarps * 32, merge_smem, stream>>>(
      ptr<const float>(part_v), ptr<const int>(part_i), int(chunks), N, int(k), ptr<float>(values),
      ptr<int64_t>(indices));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, indices};
}

}  // namespace binsparse_cuda
