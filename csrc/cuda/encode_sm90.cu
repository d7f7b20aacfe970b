// Hopper (sm_90a) fused encoder: the same op as encode_topk_kernel (exact top-k of
// z = x W^T + b - theta, or ReLU(x W^T + b), lowest index among ties, NaN first, rows sorted,
// never writing [N, M]), on wgmma tensor cores fed by TMA.
//
// CTA = 3 warpgroups on one block of 64 tokens and one chunk of latents, cut in tiles of 256:
//   * warpgroup 0, the producer: one thread issues TMA loads of [64 x 64] x and [256 x 64] W_enc
//     slabs into a ring of `stages` shared-memory stages (mbarrier full/empty pairs);
//   * warpgroups 1 and 2, the consumers: consumer c takes tiles c, c + 2, ...: a 64 x 256 wgmma tile
//     (128 fp32 accumulators per thread), then its epilogue. A pair of named barriers makes their
//     MMA phases alternate (the ping-pong schedule of FlashAttention-3), so one consumer's epilogue
//     runs while the other's MMAs keep the tensor cores busy.
// Epilogue, threshold-gated: the 4 lanes holding a row (a quad) keep its running top-k list in
// shared memory and a lower bound tau on its k-th best score in registers. Every score is added its
// bias and compared with tau (a few instructions per score, a branch taken only by survivors).
// Survivors are compacted into the thread's own staging slots and then inserted exactly
// (quad_offer: while the list is not full append, else replace the worst entry if the candidate
// beats it and recompute the worst); tau rises to the k-th best. The staging slots are only a
// cache: when they are full the scan remembers the first score it could not stage, the staged ones
// are inserted, and the scan resumes there with the tighter tau, so nothing depends on their size.
// A consumer's first tile starts tau at a bisection lower bound on the tile's k-th best instead of
// -inf, so that only about k of its scores are inserted. At the end the two consumers' lists of
// each row are merged and written (sorted into the output when one chunk covers all latents, else
// as partial lists for merge_topk_kernel).
#include "encode_sm90.h"

#include <c10/cuda/CUDAException.h>

#include "topk.cuh"

#if defined(BINSPARSE_SM90A)
#include <cute/tensor.hpp>  // first: the atom headers below build on it
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#endif

namespace binsparse_cuda {

namespace sm90 {

constexpr int kRows = kSm90Rows;
constexpr int kCols = kSm90Cols;
constexpr int kBK = 64;                      // 64 16-bit elements = one 128-byte swizzle row
constexpr int kThreads = 384;                // producer + 2 consumer warpgroups
constexpr int kMaxStages = 4;
constexpr int kStaged = 6;                   // staging slots per consumer thread (a cache, see above)
constexpr int kConsumerThreads = 256;
[[maybe_unused]] constexpr int kBisections = 12;  // steps of the first tile's lower bound on the k-th best
constexpr int kStageBytes = (kRows + kCols) * kBK * 2;  // 40 KiB, a multiple of 1024
constexpr int kAlign = 1024;                 // swizzle-128B tiles start on a 1024-byte boundary
constexpr int kValues = kRows * kCols / 128;  // accumulators per consumer thread (128)

size_t smem_bytes(int k, int stages) {
  return kAlign + size_t(stages) * kStageBytes + size_t(2) * kRows * k * 8 + size_t(kConsumerThreads) * kStaged * 8 +
         size_t(2) * kRows * sizeof(QuadTopk) +
         size_t(2) * stages * sizeof(uint64_t);
}

struct Params {
  const float* bias;
  bool binary;
  int64_t N, M, d;
  int k;
  int64_t chunk_cols;
  int stages;
  float* part_v;
  int* part_i;
  float* out_v;
  int64_t* out_i;
};

// Position in the ring of stages: slot and the parity of its current use.
struct Ring {
  int slot;
  unsigned phase;
  int stages;
  __device__ void advance(int steps) {  // steps >= 0
    const int wraps = steps / stages;
    slot += steps % stages;
    int flips = wraps;
    if (slot >= stages) {
      slot -= stages;
      ++flips;
    }
    phase ^= unsigned(flips) & 1u;
  }
};

#if defined(BINSPARSE_SM90A)

using namespace cute;

template <class E>
struct Layouts {
  using A = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kRows>, Int<kBK>>{}));
  using B = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kCols>, Int<kBK>>{}));
  using Atom = std::conditional_t<std::is_same_v<E, cutlass::bfloat16_t>,
                                  SM90_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>,
                                  SM90_64x256x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>>;
};

// The epilogue below reads the accumulators by this map, written out from the wgmma D-fragment
// layout: value i = e + 2h + 4n of thread t (lane l, warp w of its warpgroup) holds row
// 16w + l/4 + 8h and column 8n + 2(l%4) + e of the 64 x 256 tile. Checked against CuTe's layout
// at compile time.
constexpr int frag_row(int t, int i) { return 16 * ((t / 32) % 4) + (t % 32) / 4 + 8 * ((i / 2) % 2); }
constexpr int frag_col(int t, int i) { return 8 * (i / 4) + 2 * ((t % 32) % 4) + i % 2; }
// A CuTe layout is a sum over its modes, CLayout(t, i) = CLayout(t, 0) + CLayout(0, i), and so is
// the map above, so checking each mode alone checks every (t, i).
template <class Atom>
constexpr bool fragment_map_matches() {
  using CLayout = typename MMA_Traits<Atom>::CLayout;  // (thread, value) -> row + 64 * column
  auto map = [](int t, int i) { return frag_row(t, i) + kRows * frag_col(t, i); };
  if (size<0>(CLayout{}) != 128 || size<1>(CLayout{}) != kValues) return false;
  for (int t = 0; t < 128; ++t)
    if (CLayout{}(t, 0) != map(t, 0) || map(t, 5) != map(t, 0) + map(0, 5)) return false;
  for (int i = 0; i < kValues; ++i)
    if (CLayout{}(0, i) != map(0, i) || map(77, i) != map(77, 0) + map(0, i)) return false;
  return true;
}
static_assert(fragment_map_matches<Layouts<cutlass::bfloat16_t>::Atom>(), "wgmma accumulator layout changed");
static_assert(fragment_map_matches<Layouts<cutlass::half_t>::Atom>(), "wgmma accumulator layout changed");

// ---------------------------------------------------------------------------------------------
// Epilogue of one consumer's tile: scores in place, gate, compaction, exact insertion.
// ---------------------------------------------------------------------------------------------

// The thread's two rows in the 64-row block (16w + l/4 and + 8) and their gates: scores below tau
// cannot enter the row's top-k (+inf for rows >= N). The rows' list states (QuadTopk) stay in
// shared memory between insertions, to leave registers to the 128 accumulators.
struct RowsOfThread {
  int local[2];
  float tau[2];
};

[[maybe_unused]] constexpr int kNoCandidate = -1;  // staged code of "nothing" (codes are >= 0)

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}
__device__ __forceinline__ float quad_min(float v) {
  v = fminf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fminf(v, __shfl_xor_sync(kFullMask, v, 2));
}
__device__ __forceinline__ int quad_sum(int v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

// A lower bound on the k-th best score of row h in a full tile (256 columns, k <= 128): bisection
// between the row's least and greatest score, keeping `lo` such that at least k scores z have
// !(z < lo) (NaN included). Scores below it are beaten by k others, so the gate may start there
// instead of at -inf, and only about k scores of the consumer's first tile survive. Every lane of
// the warp runs every step (full-mask shuffles); a quad whose row holds +-inf returns -inf.
template <class Acc>
__device__ __forceinline__ float tile_kth_lower_bound(const Acc& acc, int h, int k) {
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int i = 2 * h; i < kValues; i += (i % 2 == 0 ? 1 : 3)) {  // i = e + 2h + 4n
    lo = fminf(lo, acc(i));
    hi = fmaxf(hi, acc(i));
  }
  lo = quad_min(lo);
  hi = quad_max(hi);
  const bool finite = isfinite(lo) && isfinite(hi);
#pragma unroll 1
  for (int step = 0; step < kBisections; ++step) {
    const float mid = lo + (hi - lo) * 0.5f;
    int count = 0;
#pragma unroll
    for (int i = 2 * h; i < kValues; i += (i % 2 == 0 ? 1 : 3)) count += !(acc(i) < mid);
    count = quad_sum(count);
    if (finite && mid > lo && mid < hi) {
      if (count >= k) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
  }
  return finite ? lo : -INFINITY;
}

// Scores of one tile; columns at or beyond col_end (zero-padded in the last tile) pass the gate
// like any other but are dropped when inserted.
template <bool kBinary, class Acc>
__device__ __forceinline__ void epilogue(Acc& acc, RowsOfThread& rows, const Params& p, int64_t col0, int64_t col_end,
                                         bool first_tile, float* lv, int* li, float* sv, int* si, QuadTopk* tops) {
  const int lane = threadIdx.x % 32, pair = 2 * (lane % 4);
  // z = (acc + b) - theta, or ReLU(acc + b) keeping NaN, in place.
#pragma unroll
  for (int n = 0; n < kValues / 4; ++n) {
    const int64_t col = col0 + 8 * n + pair;  // even; the bias array is padded to whole tiles
    float b[2], th[2] = {0.f, 0.f};
    if constexpr (kBinary) {
      const float4 bt = __ldg(reinterpret_cast<const float4*>(p.bias) + col / 2);
      b[0] = bt.x; th[0] = bt.y; b[1] = bt.z; th[1] = bt.w;
    } else {
      const float2 b2 = __ldg(reinterpret_cast<const float2*>(p.bias) + col / 2);
      b[0] = b2.x; b[1] = b2.y;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = e + 2 * h + 4 * n;
        const float pre = acc(i) + b[e];
        acc(i) = kBinary ? pre - th[e] : (pre < 0.f ? 0.f : pre);
      }
  }
  if (first_tile && col_end - col0 >= kCols) {  // empty lists: start the gate near the tile's k-th best
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float bound = tile_kth_lower_bound(acc, h, p.k);
      if (rows.tau[h] != INFINITY) rows.tau[h] = bound;
    }
  }

  // Survivors (!(z < tau)) go to this thread's kStaged staging slots. When they are full the scan
  // remembers the first score it could not stage; the staged ones are inserted (tau rises) and the
  // scan resumes there. Scores are compared 8 at a time, and only a group with a survivor branches
  // to the staging code (about 2 instructions per score when nothing survives).
  int start = 0;
  for (;;) {
    if (!__any_sync(kFullMask, start < kValues)) break;
    int count = 0, stop = kValues;
#pragma unroll
    for (int g = 0; g < kValues; g += 8) {
      bool group = false;
#pragma unroll
      for (int i = g; i < g + 8; ++i) group |= !(acc(i) < rows.tau[(i / 2) % 2]);
      if (group) {
#pragma unroll
        for (int i = g; i < g + 8; ++i) {
          const int h = (i / 2) % 2;
          if (i >= start && !(acc(i) < rows.tau[h])) {
            if (count < kStaged) {
              // A compile-time code (the column 8n + e within the lane's pair, and the row), so that
              // no register holds it: the insertion adds col0 + 2 (lane % 4).
              sv[count * kConsumerThreads] = acc(i);
              si[count * kConsumerThreads] = frag_col(0, i) | (h << 8);
              ++count;
            } else {
              stop = min(stop, i);
            }
          }
        }
      }
    }
    start = stop;
    if (!__any_sync(kFullMask, count > 0)) break;
    // Insert: the quad's lanes take turns, each staged entry into the list of its row.
    __syncwarp();
    QuadTopk top[2] = {tops[rows.local[0]], tops[rows.local[1]]};
    const int most = __reduce_max_sync(kFullMask, count);
    for (int e = 0; e < most; ++e) {
      const float mine_v = e < count ? sv[e * kConsumerThreads] : 0.f;
      const int mine_code = e < count ? si[e * kConsumerThreads] : kNoCandidate;
#pragma unroll 1
      for (int src = 0; src < 4; ++src) {
        const float cv = __shfl_sync(kFullMask, mine_v, (lane & ~3) | src);
        const int code = __shfl_sync(kFullMask, mine_code, (lane & ~3) | src);
        const int64_t column = col0 + 2 * src + (code & 0xff);
        const int col = static_cast<int>(column), h = code >> 8;
        const bool has = code != kNoCandidate && column < col_end;
        // The state of the candidate's row, picked by selects (no register array indexed at run time).
        QuadTopk row_top = h == 1 ? top[1] : top[0];
        const int row = h == 1 ? rows.local[1] : rows.local[0];
        quad_offer(lv + row * p.k, li + row * p.k, p.k, row_top, cv, col, has);
        if (h == 1) {
          top[1] = row_top;
        } else {
          top[0] = row_top;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (top[h].count >= p.k) rows.tau[h] = fmaxf(rows.tau[h], top[h].wv);
      if ((lane & 3) == 0) tops[rows.local[h]] = top[h];
    }
    __syncwarp();  // the staging slots are refilled by the next scan; the states are read again
  }
}

template <class E, class TmaA, class TmaB>
__global__ void __launch_bounds__(kThreads, 1)
    encode_sm90_kernel(CUTE_GRID_CONSTANT TmaA const tma_a, CUTE_GRID_CONSTANT TmaB const tma_b, Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layouts<E>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((kAlign - cast_smem_ptr_to_uint(smem_raw) % kAlign) % kAlign);
  const int stages = p.stages, k = p.k;
  auto stage_a = [&](int s) { return reinterpret_cast<E*>(smem + size_t(s) * kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<E*>(smem + size_t(s) * kStageBytes) + kRows * kBK; };
  float* list_v = reinterpret_cast<float*>(smem + size_t(stages) * kStageBytes);  // [consumer][row][k]
  int* list_i = reinterpret_cast<int*>(list_v + 2 * kRows * k);
  float* staged_v = reinterpret_cast<float*>(list_i + 2 * kRows * k);  // [slot][consumer thread]
  int* staged_i = reinterpret_cast<int*>(staged_v + kConsumerThreads * kStaged);
  QuadTopk* tops = reinterpret_cast<QuadTopk*>(staged_i + kConsumerThreads * kStaged);  // [consumer][row]
  uint64_t* full = reinterpret_cast<uint64_t*>(tops + 2 * kRows);                        // TMA landed
  uint64_t* empty = full + stages;                                                 // consumer done

  // Named barriers 8 + {0, 1} order the consumers' MMA phases, 8 + 2 joins them before the merge
  // (CUTLASS's NamedBarrier numbers user barriers from 8, leaving 0..7 to itself).
  constexpr unsigned kOrderBarrier = 0, kConsumersBarrier = 2;
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, warp = tid / 32, lane = threadIdx.x % 32;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t col_begin = int64_t(blockIdx.y) * p.chunk_cols;
  const int64_t col_end = min(p.M, col_begin + p.chunk_cols);
  const int ntiles = static_cast<int>((col_end - col_begin + kCols - 1) / kCols);
  const int nk = static_cast<int>((p.d + kBK - 1) / kBK);

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&full[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty[s], 4);  // one arrival per consumer warp
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // Producer: one thread walks the tiles in order, k-slab by k-slab, through the ring.
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (tid == 0) {
      prefetch_tma_descriptor(tma_a.get_tma_descriptor());
      prefetch_tma_descriptor(tma_b.get_tma_descriptor());
      Tensor gA = local_tile(tma_a.get_tma_tensor(make_shape(int(p.N), int(p.d))), Shape<Int<kRows>, Int<kBK>>{},
                             make_coord(int(blockIdx.x), _));  // (64, 64, nk)
      Tensor gB = local_tile(tma_b.get_tma_tensor(make_shape(int(p.M), int(p.d))), Shape<Int<kCols>, Int<kBK>>{},
                             make_coord(_, _));  // (256, 64, tiles of M, nk)
      const int tile0 = static_cast<int>(col_begin / kCols);
      Ring ring{0, 0u, stages};
      for (int j = 0; j < ntiles; ++j) {
        for (int kb = 0; kb < nk; ++kb) {
          const int s = ring.slot;
          cutlass::arch::ClusterBarrier::wait(&empty[s], ring.phase ^ 1u);  // first use: passes at once
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full[s], kStageBytes);
          auto [tAgA, tAsA] = tma_partition(tma_a, Int<0>{}, Layout<_1>{},
                                            group_modes<0, 2>(make_tensor(make_smem_ptr(stage_a(s)), typename L::A{})),
                                            group_modes<0, 2>(gA));
          auto [tBgB, tBsB] = tma_partition(tma_b, Int<0>{}, Layout<_1>{},
                                            group_modes<0, 2>(make_tensor(make_smem_ptr(stage_b(s)), typename L::B{})),
                                            group_modes<0, 2>(gB));
          copy(tma_a.with(full[s]), tAgA(_, kb), tAsA);
          copy(tma_b.with(full[s]), tBgB(_, tile0 + j, kb), tBsB);
          ring.advance(1);
        }
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<232>();
    const int c = wg - 1;
    float* lv = list_v + c * kRows * k;
    int* li = list_i + c * kRows * k;
    float* sv = staged_v + threadIdx.x - 128;  // this thread's slots, kConsumerThreads apart
    int* si = staged_i + threadIdx.x - 128;
    // This warp's 16 rows: empty lists (only this warp touches them until the merge).
    for (int e = lane; e < 16 * k; e += 32) {
      lv[16 * warp * k + e] = -INFINITY;
      li[16 * warp * k + e] = kEmptyIndex;
    }
    __syncwarp();
    QuadTopk* my_tops = tops + c * kRows;
    RowsOfThread rows;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rows.local[h] = frag_row(tid, 2 * h);
      rows.tau[h] = row0 + rows.local[h] < p.N ? -INFINITY : INFINITY;  // +inf: only NaN passes
      if (lane % 4 == 0) my_tops[rows.local[h]] = QuadTopk{0, -INFINITY, kEmptyIndex, 0};
    }
    __syncwarp();

    auto mma = make_tiled_mma(typename L::Atom{});
    auto thr = mma.get_thread_slice(tid);
    Tensor acc = partition_fragment_C(mma, Shape<Int<kRows>, Int<kCols>>{});
    static_assert(decltype(size(acc))::value == kValues);

    Ring ring{0, 0u, stages};
    if (c == 1) {
      ring.advance(nk);                                                     // tile 1's first slab
      cutlass::arch::NamedBarrier::arrive(256, kOrderBarrier + 0);          // consumer 0 goes first
    }
    for (int j = c; j < ntiles; j += 2) {
      // MMA phase: wait for my turn, issue the tile's wgmmas slab by slab, then hand over.
      cutlass::arch::NamedBarrier::sync(256, kOrderBarrier + c);
      mma.accumulate_ = GMMA::ScaleOut::Zero;  // the tile's first wgmma overwrites the accumulators
      int previous = -1;
      for (int kb = 0; kb < nk; ++kb) {
        const int s = ring.slot;
        cutlass::arch::ClusterTransactionBarrier::wait(&full[s], ring.phase);
        Tensor tCrA = thr.make_fragment_A(thr.partition_A(make_tensor(make_smem_ptr(stage_a(s)), typename L::A{})));
        Tensor tCrB = thr.make_fragment_B(thr.partition_B(make_tensor(make_smem_ptr(stage_b(s)), typename L::B{})));
        warpgroup_fence_operand(acc);
        warpgroup_arrive();  // wgmma.fence: the epilogue wrote these accumulator registers
#pragma unroll
        for (int kk = 0; kk < size<2>(tCrA); ++kk) {
          gemm(mma, tCrA(_, _, kk), tCrB(_, _, kk), acc);
          mma.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        warpgroup_fence_operand(acc);
        if (previous >= 0) {
          warpgroup_wait<1>();  // the previous slab's wgmmas are done reading it
          if (lane == 0) cutlass::arch::ClusterBarrier::arrive(&empty[previous]);
        }
        previous = s;
        ring.advance(1);
      }
      warpgroup_fence_operand(acc);
      if (j + 1 < ntiles) cutlass::arch::NamedBarrier::arrive(256, kOrderBarrier + (1 - c));
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      if (lane == 0) cutlass::arch::ClusterBarrier::arrive(&empty[previous]);
      ring.advance(nk);  // the other consumer's tile

      const int64_t col0 = col_begin + int64_t(j) * kCols;
      const bool first = j == c;
      if (p.binary) {
        epilogue<true>(acc, rows, p, col0, col_end, first, lv, li, sv, si, my_tops);
      } else {
        epilogue<false>(acc, rows, p, col0, col_end, first, lv, li, sv, si, my_tops);
      }
    }

    // Merge: consumer 1's list of each row into consumer 0's, then write it (8 warps, 8 rows each).
    cutlass::arch::NamedBarrier::sync(256, kConsumersBarrier);
    const int merge_warp = 4 * c + warp;
    for (int r = merge_warp; r < kRows; r += 8) {
      const int64_t gr = row0 + r;
      if (gr >= p.N) break;  // warp-uniform; no barrier follows
      float* v0 = list_v + r * k;
      int* i0 = list_i + r * k;
      const float* v1 = list_v + (kRows + r) * k;
      const int* i1 = list_i + (kRows + r) * k;
      float wv;
      int wi, ws;
      warp_worst(v0, i0, k, wv, wi, ws);
      __syncwarp();
      for (int s0 = 0; s0 < k; s0 += 32) {
        const int s = s0 + lane;
        const bool valid = s < k;
        warp_offer(v0, i0, k, wv, wi, ws, valid ? v1[s] : 0.f, valid ? i1[s] : 0, valid);
      }
      __syncwarp();
      if (p.out_v != nullptr) {
        warp_write_sorted(v0, i0, k, p.out_v + gr * k, p.out_i + gr * k);
      } else {
        const int64_t base = (int64_t(blockIdx.y) * p.N + gr) * k;
        warp_write_sorted(v0, i0, k, p.part_v + base, p.part_i + base);
      }
    }
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Built for a Hopper-or-newer target without the sm_90a features (e.g. TORCH_CUDA_ARCH_LIST naming
  // plain 9.0): if the driver ever picked this image, fail loudly instead of leaving the outputs unset.
  __trap();
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <class E>
void launch(const Sm90EncodeArgs& a) {
  using L = Layouts<E>;
  // TMA descriptors over x [N, d] and W [M, d] (K-major); out-of-range boxes are zero-filled.
  Tensor gx = make_tensor(make_gmem_ptr(static_cast<const E*>(a.x)), make_shape(int(a.N), int(a.d)),
                          make_stride(int64_t(a.d), Int<1>{}));
  Tensor gw = make_tensor(make_gmem_ptr(static_cast<const E*>(a.W)), make_shape(int(a.M), int(a.d)),
                          make_stride(int64_t(a.d), Int<1>{}));
  auto tma_a = make_tma_copy(SM90_TMA_LOAD{}, gx, typename L::A{});
  auto tma_b = make_tma_copy(SM90_TMA_LOAD{}, gw, typename L::B{});
  Params p{a.bias, a.binary, a.N, a.M, a.d, a.k, a.chunk_cols, a.stages, a.part_v, a.part_i, a.out_v, a.out_i};
  auto kernel = encode_sm90_kernel<E, decltype(tma_a), decltype(tma_b)>;
  const size_t smem = smem_bytes(a.k, a.stages);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<dim3(unsigned(a.row_blocks), unsigned(a.chunks)), kThreads, smem, a.stream>>>(tma_a, tma_b, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // BINSPARSE_SM90A

}  // namespace sm90

bool sm90_encode_built() {
#if defined(BINSPARSE_SM90A)
  return true;
#else
  return false;
#endif
}

int sm90_stages(int k, size_t smem_optin) {
  for (int stages = sm90::kMaxStages; stages >= 2; --stages)
    if (sm90::smem_bytes(k, stages) <= smem_optin) return stages;
  return 0;
}

void launch_sm90_encode(const Sm90EncodeArgs& args) {
#if defined(BINSPARSE_SM90A)
  if (args.bf16) {
    sm90::launch<cutlass::bfloat16_t>(args);
  } else {
    sm90::launch<cutlass::half_t>(args);
  }
#else
  (void)args;
  TORCH_CHECK(false, "the sm_90 encode kernel is not in this build");
#endif
}

}  // namespace binsparse_cuda
