// Interface of the Hopper encode kernel (encode_sm90.cu) for the dispatch in encode_forward.cu.
// Plain types only, so that encode_sm90.cu needs no torch headers next to CUTLASS.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace binsparse_cuda {

constexpr int kSm90Rows = 64;   // tokens per CTA (both consumer warpgroups work on the same rows)
constexpr int kSm90Cols = 256;  // latents per tile (one consumer warpgroup's wgmma N)

struct Sm90EncodeArgs {
  const void* x;        // [N, d] bfloat16 or float16, 16-byte aligned, d % 8 == 0
  const void* W;        // [M, d], same dtype
  bool bf16;            // else float16
  const float* bias;    // binary: [ceil(M / 256) * 256, 2] interleaved (b_enc, theta); else [.., 1]; zero padded
  bool binary;
  int64_t N, M, d;
  int k;
  int64_t row_blocks, chunks, chunk_cols;  // grid (row_blocks, chunks); chunk_cols a multiple of 256
  int stages;                              // TMA pipeline depth, from sm90_stages
  float* part_v;        // chunks > 1: partial lists [chunks, N, k]
  int* part_i;
  float* out_v;         // chunks == 1: the sorted result [N, k]
  int64_t* out_i;
  cudaStream_t stream;
};

// Whether this build holds the kernel's sm_90a code (TORCH_CUDA_ARCH_LIST had 9.0a).
bool sm90_encode_built();
// Pipeline stages (at most 4) that fit next to the lists for k in the opt-in shared memory; < 2: none.
int sm90_stages(int k, size_t smem_optin);
void launch_sm90_encode(const Sm90EncodeArgs& args);

}  // namespace binsparse_cuda
