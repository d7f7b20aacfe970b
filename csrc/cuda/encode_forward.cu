// Fused encoder: pre = x @ W_enc^T + b_enc, then z = pre - theta (binary) or ReLU(pre)
// (continuous), then an exact per-row top-k, without ever writing the [N, M] pre-activations.
//
// Two fused kernels, picked by `encode_forward` at the bottom of this file:
// * encode_sm90.cu (compute capability 9.0, 16-bit inputs): wgmma fed by TMA, warp-specialised;
// * encode_topk_kernel here (every other GPU, fp32, and the sm_90 kernel's unsupported shapes):
//   grid = (row block of BM tokens) x (latent chunk). Each CTA runs a GEMM tile loop over its
//   chunk, BN latents at a time: tensor cores (ldmatrix + mma.sync m16n8k16, fp32 accumulate) for
//   bf16/fp16 and SIMT FMAs for fp32 (fp32 math, as the reference). The accumulator tile goes to
//   shared memory and the epilogue adds the bias, subtracts theta or applies ReLU, and offers every
//   value to its row's running top-k (warp_offer in topk.cuh: only values beating the row's current
//   k-th are inserted).
// Each CTA writes an exact top-k per row: sorted straight into the output when one chunk covers all
// latents, else as a partial list that a small merge kernel combines with the others in a fixed
// order. k > kMaxFusedK uses a chunked GEMM + exact top-k on packed keys (encode_fallback).
#include "common.cuh"
#include "encode_sm90.h"

namespace binsparse_cuda {
namespace {

constexpr int BM = 64;    // tokens per CTA
constexpr int BN = 128;   // latents per tile
constexpr int BK = 32;    // reduction step
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int LDC = BN + 8;  // fp32 accumulator tile row stride (floats): == 8 mod 32, so the 64-bit
                             // fragment stores of a half-warp hit 32 distinct banks
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

// cp.async with "memory" clobbers, so the compiler never moves shared-memory accesses across them.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool in_range) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = in_range ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Four 8x8 16-bit matrices from shared memory (ldmatrix): lane l gives the address of row l % 8 of
// matrix l / 8 and receives, of each matrix j, the pair (row l / 4, columns 2 (l % 4) + {0, 1}) in r[j].
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

// D = A (16x16, row-major) * B (16x8, "col": B^T row-major) + D, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

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
    // 8 warps as 2 (rows) x 4 (latents); each warp owns a 32 x 32 block = 2 (m16) x 4 (n8) mma tiles.
    // Fragment layouts (PTX ISA, mma.m16n8k16): with g = lane / 4, t = lane % 4, A holds
    // (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B holds (k = 2t.., n = g), (k = 2t+8.., n = g);
    // the accumulator holds (g, 2t + {0,1}) and (g+8, 2t + {0,1}).
    const int wm = warp / 4, wn = warp % 4, lane = threadIdx.x % 32;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    // ldmatrix row addresses: A matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) in the order the A
    // fragment wants; B matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
    const int a_row = lane % 16, a_col = (lane / 16) * 8;
    const int b_row = lane % 8 + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;
    for (int kt = 0; kt < nk; ++kt) {
      cp_async_wait<C::kStages - 2>();
      __syncthreads();  // stage kt is visible to all; stage kt-1 is free to overwrite
      if (kt + C::kStages - 1 < nk) load(kt + C::kStages - 1);
      cp_async_commit();
      const T* sA = stages + (kt % C::kStages) * C::kStageElems;
      const T* sB = sA + BM * C::LD;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        unsigned a[2][4], b[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) ldmatrix_x4(a[i], sA + (wm * 32 + i * 16 + a_row) * C::LD + kk + a_col);
#pragma unroll
        for (int j = 0; j < 2; ++j) ldmatrix_x4(b[j], sB + (wn * 32 + j * 16 + b_row) * C::LD + kk + b_col);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_16816<T>(acc[i][j], a[i], b[j / 2][(j % 2) * 2], b[j / 2][(j % 2) * 2 + 1]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the pipeline buffers alias the accumulator tile
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          *reinterpret_cast<float2*>(tile + (wm * 32 + i * 16 + g + 8 * h) * LDC + wn * 32 + j * 8 + 2 * t) =
              make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
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

// Output of one CTA: `out_v`/`out_i` non-null (one chunk covers all latents): row r's final sorted
// top-k at out + r * k; otherwise the partial lists of chunk c at part + (c * N + r) * k.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    encode_topk_kernel(const T* __restrict__ x, const T* __restrict__ W, const float* __restrict__ b_enc,
                       const float* __restrict__ theta, int64_t N, int64_t M, int64_t d, int k, int64_t chunk_cols,
                       bool vec, float* __restrict__ part_v, int* __restrict__ part_i, float* __restrict__ out_v,
                       int64_t* __restrict__ out_i) {
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
    // Epilogue: each lane looks at 4 latents of the tile, whose bias and threshold it reads once;
    // warp w owns rows w, w + 8, ...
    float bias[BN / 32], thr[BN / 32];
#pragma unroll
    for (int q = 0; q < BN / 32; ++q) {
      const int64_t col = col0 + lane + 32 * q;
      const bool valid = col < col_end;
      bias[q] = valid ? b_enc[col] : 0.f;
      thr[q] = valid && theta != nullptr ? theta[col] : 0.f;
    }
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
        const float pre = tile[r * LDC + c] + bias[q];
        const float z = theta != nullptr ? pre - thr[q] : (pre < 0.f ? 0.f : pre);  // ReLU that keeps NaN
        warp_offer(lv, li, k, wv, wi, ws, z, valid ? static_cast<int>(col) : 0, valid);
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
    if (out_v != nullptr) {
      warp_write_sorted(list_v + r * k, list_i + r * k, k, out_v + gr * k, out_i + gr * k);
    } else {
      const int64_t base = (chunk * N + gr) * k;
      for (int s = lane; s < k; s += 32) {
        part_v[base + s] = list_v[r * k + s];
        part_i[base + s] = list_i[r * k + s];
      }
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
  warp_write_sorted(lv, li, k, out_v + row * k, out_i + row * k);
}

// ---------------------------------------------------------------------------------------------
// k beyond the fused limit: latents in chunks (never the full N x M at once). Each score and its
// latent index are packed into one int64 key whose order is the order of `beats` (NaN first, then
// value, then lowest index), so at::topk on the keys is an exact top-k with the tie rule and
// nothing needs a stable sort.
// ---------------------------------------------------------------------------------------------

// The key: the score's float bits mapped to an int32 that orders like the float (-0 counts as +0
// and every NaN as one positive NaN, as `beats` sees them), in the high half; ~index in the low half.
__device__ __forceinline__ int64_t score_key(float z, int index) {
  int bits = __float_as_int(z);
  if (z != z) bits = 0x7fc00000;
  if (z == 0.f) bits = 0;
  const int ordered = bits >= 0 ? bits : bits ^ 0x7fffffff;
  return int64_t(ordered) * 4294967296LL + int64_t(0xffffffffu - static_cast<unsigned>(index));
}

__global__ void score_keys_kernel(const float* __restrict__ pre, const float* __restrict__ b_enc,
                                  const float* __restrict__ theta, int64_t N, int64_t n, int64_t col0,
                                  int64_t* __restrict__ keys) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < N * n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = col0 + e % n;
    const float p = pre[e] + b_enc[col];
    const float z = theta != nullptr ? p - theta[col] : (p < 0.f ? 0.f : p);  // ReLU that keeps NaN
    keys[e] = score_key(z, static_cast<int>(col));
  }
}

__global__ void decode_keys_kernel(const int64_t* __restrict__ keys, int64_t count, float* __restrict__ values,
                                   int64_t* __restrict__ indices) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t key = keys[e];
    const int ordered = static_cast<int>(key >> 32);  // arithmetic shift: floor(key / 2^32)
    values[e] = __int_as_float(ordered >= 0 ? ordered : ordered ^ 0x7fffffff);
    indices[e] = int64_t(0xffffffffu - static_cast<unsigned>(key & 0xffffffffLL));
  }
}

unsigned elementwise_blocks(int64_t count) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((count + 255) / 256, 65535)));
}

// Scores by at::mm into fp32: 16-bit inputs run on tensor cores with exact products and fp32
// accumulation (the fused kernels' semantics), fp32 inputs in fp32 as the reference (TF32 only if
// the user turned it on). Chunks as wide as a memory budget allows (12 bytes per score: fp32 + key).
void encode_fallback(const Tensor& x, const Tensor& W, const Tensor& b, const Tensor& theta, int64_t k,
                     Tensor& values, Tensor& indices) {
  const int64_t N = x.size(0), M = W.size(0);
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const int64_t budget = std::clamp<int64_t>(int64_t(free_bytes / 4), int64_t(64) << 20, int64_t(1) << 30);
  int64_t cols = std::max<int64_t>(k, budget / (12 * N));
  cols = std::min<int64_t>(M, (cols + 127) / 128 * 128);
  const auto stream = current_stream();
  Tensor pre = at::empty({N, cols}, x.options().dtype(at::kFloat));
  Tensor keys = at::empty({N, cols}, x.options().dtype(at::kLong));
  Tensor best;  // [N, <= k] keys of the best so far, sorted
  for (int64_t c0 = 0; c0 < M; c0 += cols) {
    const int64_t n = std::min(cols, M - c0);
    Tensor p = pre.narrow(1, 0, n), key = keys.narrow(1, 0, n);
    if (n < cols) {
      p = at::empty({N, n}, pre.options());
      key = at::empty({N, n}, keys.options());
    }
    if (x.scalar_type() == at::kFloat) {
      at::mm_out(p, x, W.narrow(0, c0, n).t());
    } else {
      at::mm_out(p, x, W.narrow(0, c0, n).t(), at::kFloat);
    }
    score_keys_kernel<<<elementwise_blocks(N * n), 256, 0, stream>>>(
        ptr<const float>(p), ptr<const float>(b), theta.defined() ? ptr<const float>(theta) : nullptr, N, n, c0,
        ptr<int64_t>(key));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor top = std::get<0>(at::topk(key, std::min(k, n), 1, /*largest=*/true, /*sorted=*/true));
    best = best.defined() ? std::get<0>(at::topk(at::cat({best, top}, 1), std::min<int64_t>(k, best.size(1) + top.size(1)),
                                                 1, true, true))
                          : top;
  }
  best = best.contiguous();
  decode_keys_kernel<<<elementwise_blocks(N * k), 256, 0, stream>>>(ptr<const int64_t>(best), N * k,
                                                                    ptr<float>(values), ptr<int64_t>(indices));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which fused kernel BINSPARSE_CUDA_ENCODE asks for: unset or "auto" (the sm_90 kernel on compute
// capability 9.0 where it supports the call, the sm_80 one elsewhere), "sm80" or "sm90" (that kernel
// or a RuntimeError saying why it cannot run; for tests and benchmarks).
enum class Requested { kAuto, kSm80, kSm90 };
Requested requested_kernel() {
  const char* env = std::getenv("BINSPARSE_CUDA_ENCODE");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return Requested::kAuto;
  if (std::strcmp(env, "sm80") == 0) return Requested::kSm80;
  if (std::strcmp(env, "sm90") == 0) return Requested::kSm90;
  TORCH_CHECK(false, "BINSPARSE_CUDA_ENCODE must be auto, sm80 or sm90, got '", env, "'");
}

// How many latent chunks to split each row block's latents into: the fewest that fill at least 90%
// of the last wave of `slots` concurrent CTAs (or the best fill found), at most one per tile.
int64_t choose_chunks(int64_t row_blocks, int64_t col_tiles, int64_t slots) {
  const int64_t most = std::min<int64_t>(col_tiles, 65535);
  const int64_t least = std::min<int64_t>(most, std::max<int64_t>(1, (slots + row_blocks - 1) / row_blocks));
  int64_t best = least;
  double best_fill = 0.0;
  for (int64_t c = least; c <= std::min<int64_t>(most, 4 * least + 8); ++c) {
    const int64_t ctas = row_blocks * c;
    const double fill = double(ctas) / double((ctas + slots - 1) / slots * slots);
    if (fill >= 0.9) return c;
    if (fill > best_fill) {
      best = c;
      best_fill = fill;
    }
  }
  return best;
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
  const Requested requested = requested_kernel();
  const c10::cuda::CUDAGuard guard(x.device());
  // Weights rounded to the compute dtype once (as the reference's W.to(x.dtype)); bias in fp32.
  const Tensor W = W_enc.scalar_type() == x.scalar_type() ? W_enc : W_enc.to(x.scalar_type());
  const Tensor b = b_enc.to(at::kFloat).contiguous();

  Tensor values = at::empty({N, k}, x.options().dtype(at::kFloat));
  Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {values, indices};
  TORCH_CHECK(N < (int64_t(1) << 31) - 1, "x has too many rows (", N, ")");

  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const size_t smem_optin = size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  const bool sixteen_bit = x.scalar_type() != at::kFloat;

  // The Hopper kernel: compute capability 9.0 exactly (sm_90a code runs nowhere else), 16-bit
  // inputs, rows whose byte stride TMA accepts, and its lists and a 2-stage pipeline in shared memory.
  const char* sm90_unsupported = nullptr;
  if (!sm90_encode_built()) {
    sm90_unsupported = "the extension was built without sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)";
  } else if (device_attribute(cudaDevAttrComputeCapabilityMajor) != 9 ||
             device_attribute(cudaDevAttrComputeCapabilityMinor) != 0) {
    sm90_unsupported = "the GPU's compute capability is not 9.0";
  } else if (!sixteen_bit) {
    sm90_unsupported = "x is float32 (the sm_90 kernel takes bfloat16 and float16)";
  } else if (d == 0 || d % 8 != 0 || !aligned16(x) || !aligned16(W)) {
    sm90_unsupported = "d is 0 or not a multiple of 8, or x / W_enc is not 16-byte aligned (TMA)";
  } else if (k > kMaxFusedK || sm90_stages(int(k), smem_optin) < 2) {
    sm90_unsupported = "k is above the fused limit of 128, or its lists do not fit in shared memory";
  }
  TORCH_CHECK(requested != Requested::kSm90 || sm90_unsupported == nullptr,
              "BINSPARSE_CUDA_ENCODE=sm90, but the sm_90 encode kernel cannot run this call: ", sm90_unsupported);
  const bool use_sm90 = sm90_unsupported == nullptr && requested != Requested::kSm80;

  size_t smem = 0;
  dispatch_float(x.scalar_type(), "encode_forward",
                 [&](auto t) { smem = smem_bytes<decltype(t)>(int(std::min<int64_t>(k, kMaxFusedK))); });
  if (!use_sm90 && (k > kMaxFusedK || smem > smem_optin)) {
    TORCH_CHECK(requested == Requested::kAuto, "BINSPARSE_CUDA_ENCODE asks for a fused kernel, but k = ", k,
                " takes the chunked path (k > ", kMaxFusedK, " or the lists do not fit in shared memory)");
    encode_fallback(x, W, b, theta, k, values, indices);
    return {values, indices};
  }

  // Split the latents across CTAs so that the last wave of CTAs is nearly full; each chunk is a
  // whole number of tiles (the last one ends at M).
  const int64_t rows_per_cta = use_sm90 ? kSm90Rows : BM;
  const int64_t tile_cols = use_sm90 ? kSm90Cols : BN;
  const int64_t row_blocks = (N + rows_per_cta - 1) / rows_per_cta;
  const int64_t col_tiles = (M + tile_cols - 1) / tile_cols;
  int ctas_per_sm = 1;
  if (!use_sm90) {
    dispatch_float(x.scalar_type(), "encode_forward", [&](auto t) {
      using T = decltype(t);
      C10_CUDA_CHECK(cudaFuncSetAttribute(encode_topk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, encode_topk_kernel<T>, kThreads, smem));
    });
    ctas_per_sm = std::max(ctas_per_sm, 1);
  }
  int64_t chunks = choose_chunks(row_blocks, col_tiles, int64_t(sms) * ctas_per_sm);
  const int64_t tiles_per_chunk = (col_tiles + chunks - 1) / chunks;
  chunks = (col_tiles + tiles_per_chunk - 1) / tiles_per_chunk;

  // One chunk: the kernel writes the sorted rows itself. Several: partial lists, then the merge.
  Tensor part_v, part_i;
  if (chunks > 1) {
    part_v = at::empty({chunks, N, k}, x.options().dtype(at::kFloat));
    part_i = at::empty({chunks, N, k}, x.options().dtype(at::kInt));
  }
  float* out_v = chunks == 1 ? ptr<float>(values) : nullptr;
  int64_t* out_i = chunks == 1 ? ptr<int64_t>(indices) : nullptr;
  float* pv = chunks > 1 ? ptr<float>(part_v) : nullptr;
  int* pi = chunks > 1 ? ptr<int>(part_i) : nullptr;
  auto stream = current_stream();
  if (use_sm90) {
    Sm90EncodeArgs args;
    args.x = x.data_ptr();
    args.W = W.data_ptr();
    args.bf16 = x.scalar_type() == at::kBFloat16;
    // Bias (and threshold) per column padded to whole tiles, interleaved [b, theta] for binary.
    const int64_t padded = col_tiles * kSm90Cols;
    Tensor bias = at::zeros({padded, binary ? 2 : 1}, x.options().dtype(at::kFloat));
    bias.narrow(0, 0, M).select(1, 0).copy_(b);
    if (binary) bias.narrow(0, 0, M).select(1, 1).copy_(theta);
    args.bias = ptr<const float>(bias);
    args.binary = binary;
    args.N = N;
    args.M = M;
    args.d = d;
    args.k = int(k);
    args.row_blocks = row_blocks;
    args.chunks = chunks;
    args.chunk_cols = tiles_per_chunk * kSm90Cols;
    args.stages = sm90_stages(int(k), smem_optin);
    args.part_v = pv;
    args.part_i = pi;
    args.out_v = out_v;
    args.out_i = out_i;
    args.stream = stream;
    launch_sm90_encode(args);
  } else {
    dispatch_float(x.scalar_type(), "encode_forward", [&](auto t) {
      using T = decltype(t);
      const bool vec = d % Cfg<T>::kVec == 0 && aligned16(x) && aligned16(W);
      encode_topk_kernel<T><<<dim3(unsigned(row_blocks), unsigned(chunks)), kThreads, smem, stream>>>(
          ptr<const T>(x), ptr<const T>(W), ptr<const float>(b), binary ? ptr<const float>(theta) : nullptr, N, M, d,
          int(k), tiles_per_chunk * BN, vec, pv, pi, out_v, out_i);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (chunks > 1) {
    const size_t merge_smem = size_t(kMergeWarps) * k * (sizeof(float) + sizeof(int));
    merge_topk_kernel<<<unsigned((N + kMergeWarps - 1) / kMergeWarps), kMergeWarps * 32, merge_smem, stream>>>(
        ptr<const float>(part_v), ptr<const int>(part_i), int(chunks), N, int(k), ptr<float>(values),
        ptr<int64_t>(indices));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {values, indices};
}

}  // namespace binsparse_cuda
