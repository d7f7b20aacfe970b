// The running exact top-k shared by the CUDA encode kernels: the order of scores, the worst entry
// of a list, insertion, and the sorted write. Device code only (no torch headers), so that
// encode_sm90.cu can include it next to CUTLASS.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace binsparse_cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Warp-level running top-k. A row's list of k (value, index) pairs lives in shared memory and is
// owned by one warp; (wv, wi, ws) is its worst entry (value, index, slot), identical in all lanes.
// Order: a beats b iff a.v > b.v, or a.v == b.v and a.i < b.i (among equal values the lowest index
// wins); NaN ranks above every number, as in torch.topk. This is a strict total order on distinct
// indices, so the set kept after offering any sequence of candidates is exactly their top-k,
// whatever the order they were offered in. Empty slots hold (-inf, INT_MAX), which every real
// candidate beats.
// ---------------------------------------------------------------------------------------------

constexpr int kEmptyIndex = 0x7fffffff;

__device__ __forceinline__ bool beats(float av, int ai, float bv, int bi) {
  const bool an = av != av, bn = bv != bv;
  if (an || bn) return an && (!bn || ai < bi);
  return av > bv || (av == bv && ai < bi);
}

// Recomputes the worst entry of a list owned by a group of kGroup consecutive lanes (a warp, or
// the quad of lanes that holds a row of a wgmma accumulator); lowest slot among identical entries,
// for determinism. Every lane of the warp must call it (full-mask shuffles within each group).
template <int kGroup>
__device__ __forceinline__ void group_worst(const float* lv, const int* li, int k, float& wv, int& wi, int& ws) {
  const int member = threadIdx.x & (kGroup - 1);
  float v = INFINITY;
  int i = -1, s = -1;  // better than any entry: replaced by the first slot this lane scans
  for (int slot = member; slot < k; slot += kGroup) {
    const float sv = lv[slot];
    const int si = li[slot];
    if (s < 0 || beats(v, i, sv, si)) {
      v = sv; i = si; s = slot;
    }
  }
#pragma unroll
  for (int off = kGroup / 2; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, off);
    const int oi = __shfl_xor_sync(kFullMask, i, off);
    const int os = __shfl_xor_sync(kFullMask, s, off);
    const bool other_worse = os >= 0 && (s < 0 || beats(v, i, ov, oi) || (ov == v && oi == i && os < s));
    if (other_worse) {
      v = ov; i = oi; s = os;
    }
  }
  wv = v; wi = i; ws = s;
}

__device__ __forceinline__ void warp_worst(const float* lv, const int* li, int k, float& wv, int& wi, int& ws) {
  group_worst<32>(lv, li, k, wv, wi, ws);
}

// Every lane offers one candidate (cv, ci) if `valid`; those that beat the current worst entry
// replace it one at a time, in lane order.
__device__ __forceinline__ void warp_offer(float* lv, int* li, int k, float& wv, int& wi, int& ws, float cv,
                                           int ci, bool valid) {
  unsigned mask = __ballot_sync(kFullMask, valid && beats(cv, ci, wv, wi));
  while (mask) {
    const int src = __ffs(mask) - 1;
    mask &= mask - 1;
    const float v = __shfl_sync(kFullMask, cv, src);
    const int i = __shfl_sync(kFullMask, ci, src);
    if (beats(v, i, wv, wi)) {  // warp-uniform: the worst entry may have risen since the ballot
      if ((threadIdx.x & 31) == 0) {
        lv[ws] = v;
        li[ws] = i;
      }
      __syncwarp();
      warp_worst(lv, li, k, wv, wi, ws);
      __syncwarp();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Quad-level running top-k (the Hopper kernel): a row's list is owned by the 4 lanes that hold the
// row in a wgmma accumulator. `count` slots are filled; while count < k a candidate is appended
// (no search), and the worst entry (wv, wi, ws) is computed once the list is full and after each
// replacement. All four fields are identical in the quad's lanes.
// ---------------------------------------------------------------------------------------------

struct QuadTopk {
  int count;
  float wv;
  int wi;
  int ws;
};

// The quad offers one candidate (cv, ci), identical in its 4 lanes, if `has`. Every lane of the
// warp must call it (each quad for its own row and candidate): it contains warp-wide syncs.
__device__ __forceinline__ void quad_offer(float* lv, int* li, int k, QuadTopk& st, float cv, int ci, bool has) {
  const bool append = has && st.count < k;
  const bool replace = has && !append && beats(cv, ci, st.wv, st.wi);
  if ((threadIdx.x & 3) == 0 && (append || replace)) {
    const int slot = append ? st.count : st.ws;
    lv[slot] = cv;
    li[slot] = ci;
  }
  if (append) ++st.count;
  const bool recompute = replace || (append && st.count == k);
  __syncwarp();
  if (__any_sync(kFullMask, recompute)) {
    float v;
    int i, s;
    group_worst<4>(lv, li, k, v, i, s);
    if (recompute) {
      st.wv = v;
      st.wi = i;
      st.ws = s;
    }
  }
  __syncwarp();
}

// Writes a row's list of k entries sorted by decreasing value (the order of `beats`) to out_v/out_i:
// each entry goes to its rank, the number of entries that beat it (identical entries, possible only
// for empty slots, are told apart by slot), so every output slot is written exactly once.
template <typename Index>
__device__ __forceinline__ void warp_write_sorted(const float* lv, const int* li, int k, float* __restrict__ out_v,
                                                  Index* __restrict__ out_i) {
  for (int s = threadIdx.x & 31; s < k; s += 32) {
    const float v = lv[s];
    const int i = li[s];
    int rank = 0;
    for (int o = 0; o < k; ++o) rank += beats(lv[o], li[o], v, i) || (lv[o] == v && li[o] == i && o < s);
    out_v[rank] = v;
    out_i[rank] = static_cast<Index>(i);
  }
}

}  // namespace binsparse_cuda
