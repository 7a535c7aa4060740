// Single-query (decode) attention over a KV cache, with optional in-place accumulation
// of the softmax probabilities (H2O's score).
//
//   out[b,h,:]     = softmax(scale * q[b,h,:] . k[b,h,s,:] for s < length[b]) @ v[b,h,:length[b],:]
//   scores[b,h,s] += that probability, for s < length[b]          (when scores != nullptr)
//
// Pure CUDA (no torch headers) so that it compiles in seconds; csrc/ops.cpp checks the
// arguments and calls the two host functions at the bottom of this file.
//
// Design (memory-bound: every byte of the valid part of K and V is read exactly once).
// * Grid: one block per (b, h, split). The number of splits NS is chosen on the host from
//   B*H, S and the occupancy, never from `length` (that lives on the device and changes
//   between CUDA-graph replays). Each block reads length[b] and takes the split's share of
//   [0, length[b]), rounded to whole 32-token tiles; a block whose share is empty exits.
//   Large B*H gets NS = 1 (B=16, H=32: 512 pairs, fewer than the 660 blocks of the D=80
//   kernel resident at once on an H100): each block finishes its (b, h) alone, with no
//   second kernel. Small B*H (B=1) splits S
//   (flash-decoding) and a combine kernel merges the partial (max, sum, acc) triples.
// * Inside a block: tiles of 32 tokens of K and V are streamed into shared memory with
//   cp.async, STAGES deep, so 2-3 tiles per block are in flight while one is computed.
//   Thread t owns one 16-byte slice `part = t % VEC` of the head dimension (VEC = D / 8)
//   for tokens t / VEC + TOKS * r; so its 8 q values and 8 fp32 output accumulators stay
//   in registers for any D, and every shared-memory access of a warp is consecutive.
//   q.k partials go through shared memory (VEC does not have to divide 32, D = 80);
//   then every warp, one lane per token, sums them and runs the online softmax (log2
//   domain, fp32) redundantly, which saves a barrier. Where one block holds a whole (b, h)
//   at D = 80 (B = 16, H = 32), two tiles go through each barrier pair and softmax pass
//   (TPI = 2): the block's time is that chain, not bandwidth (H100, B = 16, 505 slots, the
//   decoder's fused H2O op: 39.0 -> 36.8 us).
// * Scores need the final max and sum of the (b, h): the raw logits go to a workspace
//   [B*H, S] fp32 as they are computed and are normalised at the end, by the block itself
//   (NS = 1) or by the combine kernel. That costs 8 extra bytes per token, against 4*D of K+V.
// * Overlap (W8A16CacheStep::overlap, the decoder's decode steps; sm_90+): launched with
//   programmatic dependent launch, the kernel reads seen / free_slot, requests its first tiles
//   (the new token's slot left out, written from v_new later) and loads its slots' scores and
//   positions while the QKV projection before it finishes; q, k_new, v_new and the rotary
//   tables are read after pdl_wait(). The combine kernel (split S) is launched the same way and
//   waits before it reads anything. Same results; see pdl.h and csrc/linear.cu.
// * Alignment: q, k, v and out are normally 16-byte aligned (D % 8 == 0); views with an odd
//   storage offset fall back to a synchronous, element-wise variant of the generic kernel.
#include "decode_attention.h"
#include "device_facts.h"
#include "half2.h"
#include "pdl.h"

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace {

constexpr int kTile = 32;             // tokens per pipeline stage; one lane per token in the softmax
constexpr int kMaxSplits = 64;        // the combine kernel holds two splits per lane of one warp
// Split S at most once per kMinSplitTokens slots, but a short cache may take up to kShortSplits
// splits of >= kShortSplitTokens slots (see choose_splits). Session 14, H100, INT8 Pythia-2.8B
// decode steps at batch 1 in the compiled decoder (max_len 2176, mean over 2,035 steps): 256 /
// 8 / 64 -> 128 / 16 / 32 took full 1.588 -> 1.554 ms per step and H2O 252/252 1.478 -> 1.451
// (16 splits instead of 9 and 8). Before programmatic launches overlapped the combine kernel,
// more splits of a long cache had cost more in the combine than they saved (the previous values
// date from commit 63e6d28: B=1, S=505, 2 -> 8 splits took the evicting op 14.1 -> 11.9 us).
constexpr int kMinSplitTokens = 128;
constexpr int kShortSplits = 16;
constexpr int kShortSplitTokens = 32;
constexpr int kKeep = 4;             // slots per thread held in registers by the score update
constexpr int kScoreChunk = 1024;     // tokens of `scores` per combine block
constexpr int kCombineThreads = 256;
constexpr int kGenericThreads = 256;  // block size of the runtime-VEC kernel
constexpr int kMaxDevices = kMaxCachedDevices;  // per-device caches of the launch
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const void* q;          // [B, H, D], strides (q_sb, q_sh, 1) in elements
  void* k;                // [B*H, S, D]
  void* v;                // [B*H, S, D]
  const int* length;      // [B] (unused when `seen` is set)
  float* scores;          // [B*H, S] or nullptr
  void* out;              // [B*H, D]
  float* logits;          // workspace [B*H, S]: logits * scale * log2(e) (only with scores)
  float* part_acc;        // workspace [B*H, NS, D]: unnormalised partial outputs (NS > 1)
  float* part_ml;         // workspace [B*H, NS, 2]: partial (max, sum) (NS > 1)
  int H, S, D, vec, splits;
  float qscale;           // scale * log2(e): softmax in base 2
  long long q_sb, q_sh;
  // Fused cache step (W8A16CacheStep), all nullptr for plain attention.
  const void* k_new;      // [B, H, D] strided: written into the cache before attending
  const void* v_new;
  long long kn_sb, kn_sh, vn_sb, vn_sh;
  const int64_t* seen;    // [1]: new token's position; length = min(seen + 1, S)
  const void* rot_cos;    // [rot_dim] rotary cos / sin of the new token, or nullptr
  const void* rot_sin;
  int rot_dim;            // rotary dims at the start of each head (even, <= D); 0 = none
  int* pos;               // [B*H, S] (evicting policies)
  int64_t* free_slot;     // [B*H]: slot of the new token (evicting); `full` uses slot = seen
  int budget, n_sink, recent;
  int early;              // PDL (W8A16CacheStep::overlap): the cache, pos, scores, seen and free_slot
                          // are read, and the first tiles requested, before pdl_wait()
};

// ---------------------------------------------------------------------------------------
// Device helpers

template <typename T> struct Elem;
template <> struct Elem<__half> {
  static __device__ __forceinline__ float2 pair(uint32_t w) { return Half2<__half>::unpack(w); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_f(uint16_t u) { return __half2float(__ushort_as_half(u)); }
  static __device__ __forceinline__ uint16_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float2 pair(uint32_t w) { return Half2<__nv_bfloat16>::unpack(w); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ float to_f(uint16_t u) { return __uint_as_float(uint32_t(u) << 16); }
  static __device__ __forceinline__ uint16_t bits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const float2 a = Elem<T>::pair(u.x), b = Elem<T>::pair(u.y);
  const float2 c = Elem<T>::pair(u.z), d = Elem<T>::pair(u.w);
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
  f[4] = c.x; f[5] = c.y; f[6] = d.x; f[7] = d.y;
}

// 8 consecutive 16-bit elements; `src` 16-byte aligned when ALIGNED, 2-byte aligned otherwise.
template <bool ALIGNED>
__device__ __forceinline__ uint4 load8(const uint16_t* src) {
  if constexpr (ALIGNED) {
    return *reinterpret_cast<const uint4*>(src);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = uint32_t(src[2 * i]) | (uint32_t(src[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// 16-byte shared-memory load. Spelled out because, for fp16, the compiler otherwise splits the
// uint4 into four 32-bit loads (seen in the PTX).
__device__ __forceinline__ uint4 lds128(const uint4* p) {
  uint4 u;
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
               : "r"(a)
               : "memory");
  return u;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
// XOR butterfly: every lane adds the same operands (commuted), so all lanes get identical bits.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Tokens [s0, s1) of a row of `len` valid slots handled by `split` of `splits`.
// Shared by the split and combine kernels, so they agree on which splits hold data.
__device__ __forceinline__ int split_chunk(int len, int splits) {
  const int chunk = (len + splits - 1) / splits;
  return (chunk + kTile - 1) / kTile * kTile;
}

__device__ __forceinline__ int clamp_length(const Params& p, int b) {
  if (p.seen != nullptr) {  // a cache step: every row holds min(seen + 1, S) tokens
    const long long n = p.seen[0] + 1;
    return n < 1 ? 0 : (n > p.S ? p.S : (int)n);
  }
  // The contract is 1 <= length <= S; clamp so that a bad value can never read out of bounds.
  return min(max(p.length[b], 0), p.S);
}

// ---------------------------------------------------------------------------------------
// Eviction (fused cache step of the evicting policies): every thread folds its slots into a
// candidate, then the block reduces. The victim is the evictable slot with the smallest key,
// ties to the oldest position; `slot < 0` means "no candidate".
struct Cand {
  float key;
  int pos;
  int slot;
};

__device__ __forceinline__ Cand no_cand() { return Cand{INFINITY, INT_MAX, -1}; }

__device__ __forceinline__ bool goes_first(const Cand& a, const Cand& b) {
  if (a.slot < 0) return false;
  if (b.slot < 0) return true;
  return a.key < b.key || (a.key == b.key && a.pos < b.pos);
}

__device__ __forceinline__ void consider(const Params& p, long long newest, int s, int ps, float key, Cand& c) {
  const bool evictable = ps >= 0 && ps >= p.n_sink && (long long)ps <= newest - p.recent;
  const Cand d{key, ps, s};
  if (evictable && goes_first(d, c)) c = d;
}

// Order-preserving map of a candidate's key to an unsigned integer, for the warp-wide minimum
// below: -0 and +0 are equal (as for `<`), and a NaN key sorts after every number (goes_first
// never prefers it to a numeric one; among NaN keys the oldest position wins).
__device__ __forceinline__ unsigned key_order(float key) {
  if (key != key) return 0xfffffffeu;
  const unsigned u = __float_as_uint(key + 0.f);  // -0 + 0 = +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The first candidate of the warp by goes_first, in every lane: the smallest key, then the
// smallest (oldest) position, by two hardware warp minimums (redux.sync, sm_80+) instead of a
// five-step shuffle tree of three-word candidates. Positions of one row are distinct, so
// (key, position) names one lane's candidate.
__device__ __forceinline__ Cand warp_first(Cand c) {
  const bool has = c.slot >= 0;  // evictable slots hold a position >= 0
  const unsigned kk = has ? key_order(c.key) : 0xffffffffu;
  const unsigned kmin = __reduce_min_sync(0xffffffffu, kk);
  const bool at_min = has && kk == kmin;
  const unsigned pmin = __reduce_min_sync(0xffffffffu, at_min ? (unsigned)c.pos : 0xffffffffu);
  const unsigned who = __ballot_sync(0xffffffffu, at_min && (unsigned)c.pos == pmin);
  if (who == 0u) return no_cand();
  const int src = __ffs(who) - 1;
  return Cand{__shfl_sync(0xffffffffu, c.key, src), __shfl_sync(0xffffffffu, c.pos, src),
              __shfl_sync(0xffffffffu, c.slot, src)};
}

// Slots first + u * stride (u < KEEP, those < end) of row bh, held in registers: scores[s] +=
// 2^(logit - M) * inv_l (with scores) and, for an evicting step, the thread's best victim
// candidate among them, folded into `c`. load_slots issues all the loads at once (old score,
// position and, given a logits row, the logit); the caller may issue them early to overlap
// their latency with other work (the split kernel keeps the logits in registers itself).
template <int KEEP>
struct SlotRegs {
  float old[KEEP];
  float lg[KEEP];
  int pv[KEEP];
};

template <int KEEP>
__device__ __forceinline__ void load_slots(const Params& p, int bh, int first, int end, int stride,
                                           const float* logits_row, SlotRegs<KEEP>& r) {
  const float* sc = p.scores + (size_t)bh * p.S;
  const int* ps = p.pos + (size_t)bh * p.S;
#pragma unroll
  for (int u = 0; u < KEEP; ++u) {
    const int s = first + u * stride;
    const bool in = s < end;
    r.old[u] = p.scores != nullptr && in ? sc[s] : 0.f;
    r.pv[u] = p.free_slot != nullptr && in ? ps[s] : -1;
    if (logits_row != nullptr) r.lg[u] = p.scores != nullptr && in ? logits_row[s] : 0.f;
  }
}

template <int KEEP>
__device__ __forceinline__ void fold_slots(const Params& p, int bh, int first, int end, int stride,
                                           const SlotRegs<KEEP>& r, float M, float inv_l, long long newest,
                                           Cand& c) {
  float* sc = p.scores + (size_t)bh * p.S;
#pragma unroll
  for (int u = 0; u < KEEP; ++u) {
    const int s = first + u * stride;
    if (s < end) {
      float key = (float)r.pv[u];
      if (p.scores != nullptr) {
        key = r.old[u] + exp2f(r.lg[u] - M) * inv_l;
        sc[s] = key;
      }
      if (p.free_slot != nullptr) consider(p, newest, s, r.pv[u], key, c);
    }
  }
}

// The same for every slot first, first + stride, ... < end, kKeep slots per round (the stores
// to `scores` would otherwise serialise the loads).
__device__ __forceinline__ Cand update_scores_and_pick(const Params& p, int bh, int first, int end, int stride,
                                                       const float* logits_row, float M, float inv_l,
                                                       long long newest) {
  Cand c = no_cand();
  for (int base = first; base < end; base += kKeep * stride) {
    SlotRegs<kKeep> r;
    load_slots<kKeep>(p, bh, base, end, stride, logits_row, r);
    fold_slots<kKeep>(p, bh, base, end, stride, r, M, inv_l, newest, c);
  }
  return c;
}

// Block-wide: picks the victim among the candidates and updates pos / free_slot of row bh.
// Called by every thread of the block (blockDim.x a multiple of 32, at most 1024).
__device__ void finish_eviction(const Params& p, int bh, int len, long long newest, Cand c) {
  __shared__ Cand s_cand[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  c = warp_first(c);
  if (lane == 0) s_cand[warp] = c;
  __syncthreads();
  if (warp == 0) {
    c = warp_first(lane < nwarps ? s_cand[lane] : no_cand());
    if (lane == 0) {
      if (newest >= p.budget) {  // budget + 1 tokens held: free the victim for the next token
        const int victim = c.slot >= 0 ? c.slot : 0;
        p.pos[(size_t)bh * p.S + victim] = -1;
        p.free_slot[bh] = victim;
      } else {
        p.free_slot[bh] = len;  // the next unused slot
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Main kernel: one block per (b*H + h, split).
//   VEC     D / 8 at compile time, or 0 for any D % 8 == 0 (read from p.vec).
//   NT      threads; NT = TOKS * VEC with TOKS a power of two dividing 32.
//   STAGES  cp.async pipeline depth (tiles of K+V in shared memory).
//   ALIGNED q, k, v, out 16-byte aligned (cp.async); otherwise element-wise loads.
//   TPI     tiles per iteration: 2 runs two 32-token tiles per barrier pair and softmax pass
//           (half the per-token latency chain of one block; used where one block holds a whole
//           (b, h), splits == 1, at D = 80), with STAGES / 2 - 1 pairs in flight.
template <typename T, int VEC, int NT, int STAGES, bool ALIGNED, int TPI>
__global__ void __launch_bounds__(NT, TPI == 2 ? 4 : 1) decode_attention_split_kernel(const Params p) {
  static_assert(NT % 32 == 0, "whole warps");
  constexpr int kVecDiv = VEC > 0 ? VEC : 1;  // keeps the compile-time divisions below defined
  static_assert(VEC == 0 || (NT % kVecDiv == 0 && kTile % (NT / kVecDiv) == 0), "TOKS must divide 32");
  static_assert(VEC != 0 || NT >= 256, "runtime VEC <= 32 needs TOKS >= 8");
  static_assert(STAGES >= 2, "pipeline depth");
  static_assert(NT >= 8 * VEC, "thread d < D holds element d of the new token (runtime VEC: D <= 256 = NT)");
  static_assert(TPI == 1 || (TPI == 2 && STAGES % 2 == 0 && STAGES >= 4), "tiles per iteration");
  constexpr int kGroups = STAGES / TPI;  // pipeline groups of TPI tiles
  constexpr int kToksStatic = VEC > 0 ? NT / kVecDiv : 0;
  constexpr int kRounds = VEC > 0 ? kTile / kToksStatic : kTile / 8;  // tokens per thread per tile
  constexpr int kCopyRounds = VEC > 0 ? (kTile * VEC + NT - 1) / NT : (kTile * 32 + NT - 1) / NT;

  const int vec = VEC > 0 ? VEC : p.vec;
  const int D = vec * 8;
  int toks = kToksStatic;  // tokens processed side by side
  if constexpr (VEC == 0) {
    toks = 32;
    while (toks * vec > NT) toks >>= 1;
  }
  const int rs = vec | 1;  // padded row of the q.k partials: odd stride, conflict-free reads

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int part = tid % vec;     // which 8 elements of the head dim this thread owns
  const int tk = tid / vec;       // first token of this thread inside a tile
  const bool active = VEC > 0 || tk < toks;

  const int bh = blockIdx.x / p.splits;
  const int split = blockIdx.x - bh * p.splits;
  const int b = bh / p.H;
  const int h = bh - b * p.H;
  if (!p.early) pdl_wait_and_trigger();
  // An evicting step's free slot, read before the length so that the two loads overlap.
  const long long free_slot = p.k_new != nullptr && p.free_slot != nullptr ? p.free_slot[bh] : -1;
  // The new token's inputs are loaded next, before any tile: issued after the tiles' 20 KB per
  // block they queued behind them, and the cache step's prologue took 6.0 us instead of 2.0
  // (H100, B = 16, H = 32, 505 slots; the call gains ~0.5 us, the loop then waits for the tiles).
  // Plain attention: this thread's 8 elements of q. Cache step: element d = tid of q, k_new and
  // v_new (NT >= D in every configuration), and of the rotary partners and cos / sin where
  // d < rot_dim. k_new and v_new are read by every block,
  // though only the one holding the new slot uses them (2 * D elements).
  uint4 q_vec = make_uint4(0, 0, 0, 0);
  uint16_t in_q = 0, in_qp = 0, in_k = 0, in_kp = 0, in_c = 0, in_s = 0, in_v = 0;
  const uint16_t* vn = p.v_new != nullptr ? static_cast<const uint16_t*>(p.v_new) + b * p.vn_sb + h * p.vn_sh : nullptr;
  auto load_inputs = [&]() {
    if (p.k_new == nullptr) {
      q_vec = load8<ALIGNED>(static_cast<const uint16_t*>(p.q) + b * p.q_sb + h * p.q_sh + part * 8);
    } else {
      if (tid < D) {
        const uint16_t* qg = static_cast<const uint16_t*>(p.q) + b * p.q_sb + h * p.q_sh;
        const uint16_t* kn = static_cast<const uint16_t*>(p.k_new) + b * p.kn_sb + h * p.kn_sh;
        in_q = qg[tid];
        in_k = kn[tid];
        in_v = vn[tid];
        if (tid < p.rot_dim) {
          const int R2 = p.rot_dim / 2;
          const int pd = tid < R2 ? tid + R2 : tid - R2;
          in_qp = qg[pd];
          in_kp = kn[pd];
          in_c = static_cast<const uint16_t*>(p.rot_cos)[tid];
          in_s = static_cast<const uint16_t*>(p.rot_sin)[tid];
        }
      }
    }
  };
  if (!p.early) load_inputs();
  const int len = clamp_length(p, b);
  const int chunk = split_chunk(len, p.splits);
  const int s0 = split * chunk;
  const int s1 = min(len, s0 + chunk);
  if (s0 >= s1) {
    // Empty share. With one split that only happens for length 0: define out = 0.
    pdl_wait();
    if (p.splits == 1)
      for (int d = tid; d < D; d += NT)
        reinterpret_cast<T*>(p.out)[(size_t)bh * D + d] = Elem<T>::from_float(0.f);
    return;
  }

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint4* s_kv = reinterpret_cast<uint4*>(smem_raw);                   // [STAGES][2][kTile*vec]
  float* s_red = reinterpret_cast<float*>(s_kv + STAGES * 2 * kTile * vec);  // [TPI * kTile][rs]
  float* s_fin = reinterpret_cast<float*>(smem_raw);  // [toks][D], reuses the stages at the end
  uint16_t* s_knew = reinterpret_cast<uint16_t*>(s_red + TPI * kTile * rs);  // [D]: the new token's key

  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + (size_t)bh * p.S * D;
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + (size_t)bh * p.S * D;
  const long long newest = p.seen != nullptr ? p.seen[0] : 0;

  // Cache step. Every block applies the rotary embedding (if given) to q; the block whose share
  // holds the new token's slot also rotates k_new and writes the token into the cache (K, V, pos
  // and a zero score). No other block reads that slot, and this block takes the token's K from
  // shared memory and its V from v_new rather than from the cache, so the stores need no fence.
  // The first tiles are requested before q and k_new are rotated (their loads were issued above).
  int new_slot = -1;  // the new token's slot if this block holds it, else -1
  if (p.k_new != nullptr) {
    const long long slot = p.free_slot != nullptr ? free_slot : newest;
    if (slot >= s0 && slot < s1) new_slot = (int)slot;
  }

  const int ntiles = (s1 - s0 + kTile - 1) / kTile;
  // One split with scores or eviction, and at most kKeep tiles per warp (S <= 640 for D = 80):
  // thread (warp, lane) keeps the logit of token lane of tiles warp + r * kWarps in registers,
  // and its slots' old score and position are loaded now, so the end of the kernel needs no
  // global loads. Otherwise the logits go through the workspace.
  constexpr int kWarps = NT / 32;
  const bool tail_work = p.scores != nullptr || p.free_slot != nullptr;
  const bool in_regs = p.splits == 1 && tail_work && ntiles <= kKeep * kWarps;
  SlotRegs<kKeep> regs;
  // Tile j = tokens [s0 + 32 j, min(s0 + 32 j + 32, s1)); K and V of those tokens are
  // contiguous in memory, n * vec 16-byte vectors each. Vectors past n are not copied
  // (and never used: the softmax masks those tokens, the P.V loop skips them). The new token's
  // K comes from s_knew; tiles requested before s_knew is ready get it written afterwards.
  auto load_tile = [&](int j, int stage, bool knew_ready) {
    const int t0 = s0 + j * kTile;
    const int nv = min(kTile, s1 - t0) * vec;
    uint4* sk = s_kv + stage * 2 * kTile * vec;
    uint4* sv = sk + kTile * vec;
    const uint16_t* kt = kg + (size_t)t0 * D;
    const uint16_t* vt = vg + (size_t)t0 * D;
#pragma unroll
    for (int r = 0; r < kCopyRounds; ++r) {
      const int i = tid + r * NT;
      if (i < nv) {
        const int tok = i / vec, piece = i - tok * vec;
        const bool fresh = t0 + tok == new_slot;
        const uint16_t* vs = fresh ? vn + piece * 8 : vt + i * 8;
        if (fresh && knew_ready) sk[i] = reinterpret_cast<const uint4*>(s_knew)[piece];
        const bool skipv = fresh && !knew_ready && p.early;  // v_new not readable yet: written later
        if constexpr (ALIGNED) {
          if (!fresh) cp_async16(sk + i, kt + i * 8);
          if (!skipv) cp_async16(sv + i, vs);
        } else {
          if (!fresh) sk[i] = load8<false>(kt + i * 8);
          if (!skipv) sv[i] = load8<false>(vs);
        }
      }
    }
  };

#pragma unroll
  for (int st = 0; st < (kGroups - 1) * TPI; ++st) {
    if (st < ntiles) load_tile(st, st, false);
    if (st % TPI == TPI - 1) cp_async_commit();
  }
  // Needed only at the end: issued behind the tiles.
  if (in_regs) load_slots<kKeep>(p, bh, warp * kTile + lane, s1, kWarps * kTile, nullptr, regs);
  if (p.early) {
    pdl_wait_and_trigger();
    load_inputs();
  }

  float qf[8];
  if (p.k_new == nullptr) {
    unpack8<T>(q_vec, qf);
#pragma unroll
    for (int i = 0; i < 8; ++i) qf[i] *= p.qscale;
  } else {
    const bool owner = new_slot >= 0;
    float* s_q = s_red;  // [D], free until the first tile
    if (tid < D) {
      const int d = tid;
      float qv = Elem<T>::to_f(in_q);
      float kv = Elem<T>::to_f(in_k);
      if (d < p.rot_dim) {  // x * cos + rotate_half(x) * sin, in fp32, rounded once (as inductor does)
        const float sg = d < p.rot_dim / 2 ? -1.f : 1.f;
        const float c = Elem<T>::to_f(in_c), si = Elem<T>::to_f(in_s);
        qv = Elem<T>::to_f(Elem<T>::bits(qv * c + sg * Elem<T>::to_f(in_qp) * si));
        kv = kv * c + sg * Elem<T>::to_f(in_kp) * si;
      }
      s_q[d] = qv;
      if (owner) {
        const uint16_t kb = Elem<T>::bits(kv);
        const size_t at = ((size_t)bh * p.S + new_slot) * D + d;
        s_knew[d] = kb;
        static_cast<uint16_t*>(p.k)[at] = kb;
        static_cast<uint16_t*>(p.v)[at] = in_v;
      }
    }
    // Read by other threads of this block (eviction, scores) only after later barriers.
    if (owner && tid == 0) {
      if (p.pos != nullptr) p.pos[(size_t)bh * p.S + new_slot] = (int)newest;
      if (p.scores != nullptr) p.scores[(size_t)bh * p.S + new_slot] = 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 8; ++i) qf[i] = s_q[part * 8 + i] * p.qscale;
    // s_q (s_red) is next written after the barrier at the top of the first tile.
    if (owner) {  // the new token's K in a tile requested above: write it now
      const int j_new = (new_slot - s0) / kTile;
      if (j_new < (kGroups - 1) * TPI) {
        uint4* sk = s_kv + j_new * 2 * kTile * vec + (new_slot - s0 - j_new * kTile) * vec;
        for (int piece = tid; piece < vec; piece += NT) sk[piece] = reinterpret_cast<const uint4*>(s_knew)[piece];
        if (p.early && tid < D) reinterpret_cast<uint16_t*>(sk + kTile * vec)[tid] = in_v;
      }
    }
  }

  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  float m = -INFINITY;  // running max of the logits (log2 domain), identical in every thread
  float l = 0.f;        // running sum of exp2(logit - m), identical in every thread
  float* logits_row = p.logits + (size_t)bh * p.S;

  for (int j = 0; j < ntiles; j += TPI) {
    cp_async_wait<kGroups - 2>();  // this thread's copies of tiles j .. j + TPI - 1 have landed
    __syncthreads();               // everyone's have; and everyone is done with the previous tiles
#pragma unroll
    for (int tt = 0; tt < TPI; ++tt) {
      const int jn = j + (kGroups - 1) * TPI + tt;
      if (jn < ntiles) load_tile(jn, jn % STAGES, true);
    }
    cp_async_commit();

    // q . k partials over this thread's 8 elements; all shared loads first, for overlap.
    // The V slices are fetched here too, so their latency hides behind the softmax.
    int n[TPI];
    uint4 kr[TPI][kRounds], vr[TPI][kRounds];
#pragma unroll
    for (int tt = 0; tt < TPI; ++tt) {
      const uint4* sk = s_kv + ((j + tt) % STAGES) * 2 * kTile * vec;
      const uint4* sv = sk + kTile * vec;
      n[tt] = min(kTile, s1 - (s0 + (j + tt) * kTile));  // <= 0: no such tile
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        const int tok = tk + r * toks;
        const bool use = active && tok < n[tt];  // tokens past n hold stale data: never read them
        kr[tt][r] = use ? lds128(sk + tok * vec + part) : make_uint4(0, 0, 0, 0);
        vr[tt][r] = use ? lds128(sv + tok * vec + part) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int tt = 0; tt < TPI; ++tt) {
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        const int tok = tk + r * toks;
        if (active && tok < kTile) {
          float kf[8];
          unpack8<T>(kr[tt][r], kf);
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) dot = fmaf(qf[i], kf[i], dot);
          s_red[(tt * kTile + tok) * rs + part] = dot;
        }
      }
    }
    __syncthreads();

    // Online softmax, redundantly in every warp: lane = token of each tile.
    float x[TPI];
    float xm = -INFINITY;
#pragma unroll
    for (int tt = 0; tt < TPI; ++tt) {
      x[tt] = -INFINITY;
      if (lane < n[tt]) {
        const float* row = s_red + (tt * kTile + lane) * rs;
        float dot = 0.f;
        if constexpr (VEC > 0) {
#pragma unroll
          for (int pp = 0; pp < VEC; ++pp) dot += row[pp];
        } else {
          for (int pp = 0; pp < vec; ++pp) dot += row[pp];
        }
        x[tt] = dot;
      }
      xm = fmaxf(xm, x[tt]);
    }
    const float m_new = fmaxf(m, warp_max(xm));  // finite: tile j holds >= 1 valid token
    const float alpha = exp2f(m - m_new);        // 0 on the first tile (m = -inf)
    float pr[TPI];
    float psum = 0.f;
#pragma unroll
    for (int tt = 0; tt < TPI; ++tt) {
      pr[tt] = exp2f(x[tt] - m_new);  // 0 for masked lanes
      psum += pr[tt];
    }
    l = l * alpha + warp_sum(psum);
    m = m_new;
#pragma unroll
    for (int tt = 0; tt < TPI; ++tt) {
      const int jt = j + tt;
      if (in_regs) {
        if (jt < ntiles && jt % kWarps == warp) {
#pragma unroll
          for (int r = 0; r < kKeep; ++r)  // a select, not a branch: regs stays in registers
            regs.lg[r] = r == jt / kWarps ? x[tt] : regs.lg[r];
        }
      } else if (p.scores != nullptr && warp == 0 && lane < n[tt]) {
        logits_row[s0 + jt * kTile + lane] = x[tt];
      }
    }

    // acc += p . v over this thread's tokens (zero slices for the masked ones).
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
    for (int tt = 0; tt < TPI; ++tt) {
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        const int tok = tk + r * toks;
        const float pt = __shfl_sync(0xffffffffu, pr[tt], tok & 31);
        float vf[8];
        unpack8<T>(vr[tt][r], vf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = fmaf(pt, vf[i], acc[i]);
      }
    }
  }

  // Reduce the accumulators of the `toks` threads that share a slice of the head dim.
  cp_async_wait<0>();  // only empty groups can be pending; s_fin reuses the stages
  __syncthreads();
  if (active) {
    float4* dst = reinterpret_cast<float4*>(s_fin + tk * D + part * 8);
    dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  }
  __syncthreads();  // also publishes this block's logits (global) to all its threads

  if (p.splits == 1) {
    const float inv_l = 1.f / l;
    T* out = reinterpret_cast<T*>(p.out) + (size_t)bh * D;
    for (int d = tid; d < D; d += NT) {
      float a = 0.f;
      for (int t = 0; t < toks; ++t) a += s_fin[t * D + d];
      out[d] = Elem<T>::from_float(a * inv_l);
    }
    if (tail_work) {
      // s0 = 0 and s1 = len here. Evicting policies fold the updated keys into the victim search.
      Cand c = no_cand();
      if (in_regs) {
        if (new_slot >= 0) {  // loaded before this block wrote the new token's slot
#pragma unroll
          for (int r = 0; r < kKeep; ++r)
            if (warp * kTile + lane + r * kWarps * kTile == new_slot) {
              regs.old[r] = 0.f;
              regs.pv[r] = (int)newest;
            }
        }
        fold_slots<kKeep>(p, bh, warp * kTile + lane, s1, kWarps * kTile, regs, m, inv_l, newest, c);
      } else {
        c = update_scores_and_pick(p, bh, s0 + tid, s1, NT, logits_row, m, inv_l, newest);
      }
      if (p.free_slot != nullptr) finish_eviction(p, bh, len, newest, c);
    }
  } else {
    const size_t slot = (size_t)bh * p.splits + split;
    float* pa = p.part_acc + slot * D;
    for (int d = tid; d < D; d += NT) {
      float a = 0.f;
      for (int t = 0; t < toks; ++t) a += s_fin[t * D + d];
      pa[d] = a;
    }
    if (tid == 0) {
      p.part_ml[slot * 2] = m;
      p.part_ml[slot * 2 + 1] = l;
    }
  }
}

// Merges the NS partial results of one (b, h): out = sum_i acc_i 2^(m_i - M) / L with
// L = sum_i l_i 2^(m_i - M), and adds 2^(logit - M) / L to scores. Grid (B*H, ceil(S/1024)
// with scores, else 1); block y handles tokens [1024 y, 1024 y + 1024) of scores, y = 0 the output.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_attention_combine_kernel(const Params p) {
  __shared__ float s_w[kMaxSplits];  // 2^(m_i - M) / L
  __shared__ float s_stat[2];        // M, 1 / L
  // Under overlap the combine is launched with programmatic dependent launch too: it waits for
  // the split kernel before reading anything, and then lets the next kernel (linear_sum, whose
  // MLP segment needs nothing from the attention) launch on its tail.
  pdl_wait_and_trigger();
  const int bh = blockIdx.x;
  const int b = bh / p.H;
  const int tid = threadIdx.x;
  const int len = clamp_length(p, b);
  const int chunk = split_chunk(len, p.splits);
  const int nact = chunk > 0 ? (len + chunk - 1) / chunk : 0;  // splits that hold tokens
  const float* ml = p.part_ml + (size_t)bh * p.splits * 2;
  const long long newest = p.seen != nullptr ? p.seen[0] : 0;

  // Score update / eviction over tokens [first, end): loaded before the max and sum are
  // known, when every thread holds its slots in registers (one chunk of <= kKeep * 256).
  const bool tail_work = p.scores != nullptr || p.free_slot != nullptr;
  const int chunk_y = p.free_slot != nullptr ? len : kScoreChunk;  // evicting: gridDim.y == 1
  const int first = blockIdx.y * chunk_y + tid;
  const int end = min(len, (int)(blockIdx.y + 1) * chunk_y);
  const bool in_regs = tail_work && end - (int)blockIdx.y * chunk_y <= kKeep * kCombineThreads;
  const float* logits_row = p.logits + (size_t)bh * p.S;
  SlotRegs<kKeep> regs;
  if (in_regs) load_slots<kKeep>(p, bh, first, end, kCombineThreads, logits_row, regs);

  if (tid < 32) {
    const int i0 = tid, i1 = tid + 32;
    const float m0 = i0 < nact ? ml[2 * i0] : -INFINITY;
    const float m1 = i1 < nact ? ml[2 * i1] : -INFINITY;
    const float l0 = i0 < nact ? ml[2 * i0 + 1] : 0.f;
    const float l1 = i1 < nact ? ml[2 * i1 + 1] : 0.f;
    const float M = warp_max(fmaxf(m0, m1));
    const float w0 = i0 < nact ? exp2f(m0 - M) : 0.f;
    const float w1 = i1 < nact ? exp2f(m1 - M) : 0.f;
    const float L = warp_sum(w0 * l0 + w1 * l1);
    const float inv_l = nact > 0 ? 1.f / L : 0.f;
    s_w[i0] = w0 * inv_l;
    s_w[i1] = w1 * inv_l;
    if (tid == 0) {
      s_stat[0] = M;
      s_stat[1] = inv_l;
    }
  }
  __syncthreads();

  if (blockIdx.y == 0) {
    const float* pa = p.part_acc + (size_t)bh * p.splits * p.D;
    T* out = reinterpret_cast<T*>(p.out) + (size_t)bh * p.D;
    for (int d = tid; d < p.D; d += kCombineThreads) {
      float a = 0.f;
      for (int i = 0; i < nact; ++i) a = fmaf(pa[(size_t)i * p.D + d], s_w[i], a);
      out[d] = Elem<T>::from_float(a);
    }
  }
  if (tail_work) {
    // An evicting step runs with one block per (b, h) (gridDim.y == 1) that sees every slot.
    Cand c = no_cand();
    if (in_regs)
      fold_slots<kKeep>(p, bh, first, end, kCombineThreads, regs, s_stat[0], s_stat[1], newest, c);
    else
      c = update_scores_and_pick(p, bh, first, end, kCombineThreads, logits_row, s_stat[0], s_stat[1], newest);
    if (p.free_slot != nullptr) finish_eviction(p, bh, len, newest, c);
  }
}

// ---------------------------------------------------------------------------------------
// Host side

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// One kernel configuration: its shared memory, its one-time setup and its launch.
template <typename T, int VEC, int NT, int STAGES, bool ALIGNED, int TPI = 1>
struct SplitConfig {
  static auto kernel() { return decode_attention_split_kernel<T, VEC, NT, STAGES, ALIGNED, TPI>; }
  static size_t smem_bytes(int vec) {
    return (size_t)STAGES * 2 * kTile * vec * 16 + (size_t)TPI * kTile * (vec | 1) * 4 + (size_t)vec * 16;
  }
  // Allow more than 48 KB of dynamic shared memory (once per device), then report how many
  // blocks fit on one multiprocessor for this vec.
  static cudaError_t blocks_per_sm(int dev, int vec, int* bpsm) {
    static std::atomic<bool> prepared[kMaxDevices];
    static std::atomic<int> cache[kMaxDevices][33];
    if (!prepared[dev].load(std::memory_order_acquire)) {
      const size_t max_smem = smem_bytes(VEC > 0 ? VEC : 32);
      cudaError_t err = cudaFuncSetAttribute(kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)max_smem);
      if (err != cudaSuccess) return err;
      prepared[dev].store(true, std::memory_order_release);
    }
    int n = cache[dev][vec].load(std::memory_order_relaxed);
    if (n == 0) {
      cudaError_t err =
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel(), NT, smem_bytes(vec));
      if (err != cudaSuccess) return err;
      if (n < 1) n = 1;
      cache[dev][vec].store(n, std::memory_order_relaxed);
    }
    *bpsm = n;
    return cudaSuccess;
  }
  static cudaError_t launch(const Params& p, long long blocks, bool pdl, cudaStream_t stream) {
    return launch_kernel(kernel(), dim3((unsigned)blocks), dim3(NT), smem_bytes(p.vec), stream, pdl, 1, p);
  }
};

// Calls f(Config{}) with the kernel configuration for (T, D, alignment). The instantiated
// head dims are Pythia's (64, 80, 128) and their neighbours; any other D % 8 == 0 runs the
// runtime-VEC kernel, and so does every misaligned call.
// pair: one split per (b, h); D = 80 then runs two tiles per iteration (TPI = 2).
template <typename T, typename F>
cudaError_t with_config(int D, bool aligned, F&& f, bool pair = false) {
  if (!aligned) return f(SplitConfig<T, 0, kGenericThreads, 2, false>{});
  switch (D) {
    case 32:  return f(SplitConfig<T, 4, 128, 4, true>{});
    case 64:  return f(SplitConfig<T, 8, 128, 4, true>{});
    case 80:  return pair ? f(SplitConfig<T, 10, 160, 4, true, 2>{}) : f(SplitConfig<T, 10, 160, 4, true>{});
    case 96:  return f(SplitConfig<T, 12, 192, 4, true>{});
    case 128: return f(SplitConfig<T, 16, 256, 4, true>{});
    case 256: return f(SplitConfig<T, 32, 256, 3, true>{});
    default:  return f(SplitConfig<T, 0, kGenericThreads, 3, true>{});
  }
}

// Splits of S per (b, h): enough blocks to fill every multiprocessor once, no more (blocks
// all carry the same work, so a second partial wave would only add a tail). Depends only on
// (B, H, S, D) and the device, so the workspace size and the launch agree.
cudaError_t choose_splits(int B, int H, int S, int D, int* splits) {
  const DeviceFacts facts = device_facts();
  const int dev = facts.dev;
  int bpsm = 1;
  cudaError_t err = with_config<__half>(D, true, [&](auto cfg) {
    return decltype(cfg)::blocks_per_sm(dev, D / 8, &bpsm);
  });
  if (err != cudaSuccess) return err;
  const long long pairs = (long long)B * H;
  long long ns = (long long)facts.sms * bpsm / (pairs > 0 ? pairs : 1);
  // At most one split per kMinSplitTokens of S, but allow kShortSplits splits of at least
  // kShortSplitTokens: a short cache (an evicting policy's S = budget + 1) is otherwise cut
  // into a few long splits, and at small B*H the time is the chain of tiles of one split.
  const long long cap = std::max<long long>(
      (S + kMinSplitTokens - 1) / kMinSplitTokens,
      std::min<long long>(kShortSplits, (S + kShortSplitTokens - 1) / kShortSplitTokens));
  if (ns > cap) ns = cap;
  if (ns > kMaxSplits) ns = kMaxSplits;
  if (ns < 1) ns = 1;
  *splits = (int)ns;
  return cudaSuccess;
}

struct WorkspaceLayout {
  size_t logits, part_acc, part_ml, total;
};

WorkspaceLayout workspace_layout(int B, int H, int S, int D, int splits) {
  const size_t pairs = (size_t)B * H;
  WorkspaceLayout w;
  w.logits = 0;
  w.part_acc = align_up(pairs * S * sizeof(float));
  const size_t acc_bytes = splits > 1 ? align_up(pairs * splits * D * sizeof(float)) : 0;
  w.part_ml = w.part_acc + acc_bytes;
  w.total = w.part_ml + (splits > 1 ? align_up(pairs * splits * 2 * sizeof(float)) : 0);
  return w;
}

template <typename T>
cudaError_t launch_typed(Params p, int B, int H, bool aligned, cudaStream_t stream) {
  const long long pairs = (long long)B * H;
  const bool pdl = p.early != 0;
  cudaError_t err = with_config<T>(p.D, aligned, [&](auto cfg) {
    int bpsm = 0;  // runs the one-time shared-memory setup of this kernel
    cudaError_t e = decltype(cfg)::blocks_per_sm(device_facts().dev, p.vec, &bpsm);
    if (e != cudaSuccess) return e;
    return decltype(cfg)::launch(p, pairs * p.splits, pdl, stream);
  }, p.splits == 1);
  if (err != cudaSuccess || p.splits == 1) return err;
  const unsigned ny = p.scores != nullptr && p.free_slot == nullptr
                         ? (unsigned)((p.S + kScoreChunk - 1) / kScoreChunk) : 1u;
  return launch_kernel(decode_attention_combine_kernel<T>, dim3((unsigned)pairs, ny), dim3(kCombineThreads), 0,
                       stream, pdl, 1, p);
}

}  // namespace

// Bytes of device workspace the launch needs (0 allowed).
size_t w8a16_decode_attention_workspace_bytes(int B, int H, int S, int D) {
  if (B <= 0 || H <= 0 || S <= 0 || D <= 0 || D % 8 != 0 || D > 256) return 0;
  int splits = 1;
  if (choose_splits(B, H, S, D, &splits) != cudaSuccess) splits = 1;
  return workspace_layout(B, H, S, D, splits).total;
}

// See decode_attention.h.
cudaError_t w8a16_decode_attention(const void* q, long long q_sb, long long q_sh, void* k, void* v,
                                   const int* length, float* scores, void* out, void* workspace, int B, int H,
                                   int S, int D, float scale, int dtype_code, const W8A16CacheStep* step,
                                   cudaStream_t stream) {
  if (B < 0 || H < 0 || S < 0 || D <= 0 || D % 8 != 0 || D > 256) return cudaErrorInvalidValue;
  if (dtype_code != 0 && dtype_code != 1) return cudaErrorInvalidValue;
  if (B == 0 || H == 0) return cudaSuccess;
  if (step != nullptr && (S == 0 || step->seen == nullptr || step->k_new == nullptr || step->v_new == nullptr ||
                          (step->free_slot == nullptr) != (step->pos == nullptr) ||
                          (step->rot_cos == nullptr) != (step->rot_sin == nullptr) ||
                          (step->rot_cos != nullptr && (step->rot_dim < 0 || step->rot_dim > D || step->rot_dim % 2))))
    return cudaErrorInvalidValue;
  if (S == 0) scores = nullptr;  // nothing to attend to: out = 0 (length is clamped to S)
  int splits = 1;
  if (S > 0) {
    cudaError_t err = choose_splits(B, H, S, D, &splits);
    if (err != cudaSuccess) return err;
  }
  const WorkspaceLayout ws = workspace_layout(B, H, S, D, splits);
  if ((scores != nullptr || splits > 1) && workspace == nullptr) return cudaErrorInvalidValue;

  const auto addr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  uintptr_t align_bits = addr(q) | addr(k) | addr(v) | addr(out) | (uintptr_t)(q_sb * 2) | (uintptr_t)(q_sh * 2);
  if (step != nullptr)
    align_bits |= addr(step->k_new) | addr(step->v_new) | (uintptr_t)(step->kn_sb * 2) |
                  (uintptr_t)(step->kn_sh * 2) | (uintptr_t)(step->vn_sb * 2) | (uintptr_t)(step->vn_sh * 2);
  const bool aligned = (align_bits & 15u) == 0;
  unsigned char* w = static_cast<unsigned char*>(workspace);
  Params p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.length = length;
  p.scores = scores;
  p.out = out;
  p.logits = w != nullptr ? reinterpret_cast<float*>(w + ws.logits) : nullptr;
  p.part_acc = w != nullptr ? reinterpret_cast<float*>(w + ws.part_acc) : nullptr;
  p.part_ml = w != nullptr ? reinterpret_cast<float*>(w + ws.part_ml) : nullptr;
  p.H = H;
  p.S = S;
  p.D = D;
  p.vec = D / 8;
  p.splits = splits;
  p.qscale = scale * kLog2e;
  p.q_sb = q_sb;
  p.q_sh = q_sh;
  const W8A16CacheStep none;
  const W8A16CacheStep& st = step != nullptr ? *step : none;
  p.k_new = st.k_new;
  p.v_new = st.v_new;
  p.kn_sb = st.kn_sb;
  p.kn_sh = st.kn_sh;
  p.vn_sb = st.vn_sb;
  p.vn_sh = st.vn_sh;
  p.seen = st.seen;
  p.rot_cos = st.rot_cos;
  p.rot_sin = st.rot_sin;
  p.rot_dim = st.rot_cos != nullptr ? st.rot_dim : 0;
  p.pos = st.pos;
  p.free_slot = st.free_slot;
  p.budget = st.budget;
  p.n_sink = st.n_sink;
  p.recent = st.recent;
  p.early = step != nullptr && st.overlap && device_facts().pdl();
  if (dtype_code == 0) return launch_typed<__half>(p, B, H, aligned, stream);
  return launch_typed<__nv_bfloat16>(p, B, H, aligned, stream);
}
