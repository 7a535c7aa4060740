// W8A16 linear: y[M, N] = act((x[M, K] @ w[N, K]^T) * scales[N] + bias[N]).
//
// x is fp16 or bf16, w int8 (row-major, as stored by torch), scales fp32, fp32
// accumulation on tensor cores (mma.sync.m16n8k16), dequantization in registers
// and scale / bias / exact-erf GeLU in the epilogue. No torch headers here: this
// file compiles in seconds; csrc/ops.cpp does the checks and the dispatch.
//
// Two kernels:
//  * gemv (M <= 32, decoding): "swap AB". The weight tile is the mma A operand
//    (16 output channels x 16 k), the activations are B (16 k x 8 tokens). Each
//    thread loads 16 contiguous weight bytes of one row straight from global
//    memory. A dot product does not depend on the order of k, so we *define* the
//    fragment's logical k order to be the one the contiguous load gives, and feed
//    x in the same order: no shuffles, no shared memory, 16-byte loads for both.
//    Warps of a block split K; one reduction through shared memory at the end.
//    For M <= 8, x is staged once per block in shared memory when it fits in 44 KB
//    (M = 1 up to K = 22528) and the launch has more than two tiles per SM: each block
//    then reads x from L2 once, and the x fragments take registers only during the
//    math. For 9-16 rows a block covers 32
//    channels (two tiles share each x fragment), and on sm_90 narrow, long-K problems
//    (linear_sum, MLP down) split K over a cluster of two blocks that reduce through
//    distributed shared memory. linear_sum_norm (opt-in) adds the residual and the next layer's two
//    layer norms in a tail of the same launch (gemv_norm_tail); measured ~1% slower per decode step
//    on H100 than the separate inductor norm kernel, see docs/kernels.md.
//    Measured on H100 and rejected: split-K over blocks with a last-block reduction,
//    at M = 16 staging x ([16, K], 80 KB at K = 2560) in shared memory (1.35x slower),
//    clusters of 4, clusters at M = 1, split-K over blocks with a last-block reduction,
//    register double-buffering, 16 warps per block (all slower than this).
//    Programmatic dependent launch (pdl.h, GemvLaunch) on sm_90. Every launch but 9-16 rows
//    in 4-warp blocks: the blocks wait for the previous kernel before any load, and gain the
//    launch gap (M = 1-8, H100: qkv 10.6 -> 8.5 us, attn_out 6.0 -> 5.0 us). Where the caller
//    asks (W8A16Linear2::overlap, the decoder's decode steps) the kernel also loads its first
//    weights and, for linear_sum, runs the whole second segment (the MLP down projection,
//    whose input predates the attention kernel before it) before it waits. H100, batch 16,
//    Pythia-2.8B shapes, with the cache op's early tiles: H2O step 2.68 -> 2.55 ms. Two
//    segments always run segment 1 first, so the flag never changes a result.
//  * gemm (M > 32, prefill): 128x128 block tile, 8 warps of 64x32, a 4-stage cp.async
//    pipeline of 64-wide k-tiles (32-wide in split launches and on GPUs with less than
//    2 x 97 KB of shared memory per SM), x through ldmatrix from an XOR-swizzled tile, int8 w
//    through 32-bit shared loads + one byte_perm that puts each thread's fragment
//    bytes together, then dequantized in registers. (Dequantizing each stage once
//    into a 16-bit tile read with ldmatrix measured no faster on H100.)
//    When the output tiles leave SMs idle (M = 128: 20 tiles for N = 2560), K is split over
//    blocks (gemm_splits' cost model), each writing fp32 partials to a workspace that a second
//    kernel sums in split order and runs the epilogue on (mlp_down M = 128: 187 -> 34 us).
//
// int8 -> fp16 uses the FasterTransformer trick: bias the byte to unsigned with
// an xor, splice it under the exponent of 1024.0 (0x64) with byte_perm, subtract
// 1152 = 1024 + 128 with one sub.f16x2: 4 values in 5 instructions, exact.
// bf16 goes through fp32 (2^23 + u) - (2^23 + 128), exact, then keeps the high halves.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "device_facts.h"
#include "linear.h"
#include "pdl.h"

namespace {

template <typename T>
struct Dequant;

template <>
struct Dequant<__half> {
  // w: 4 int8 in one register. lo = (w.b0, w.b1), hi = (w.b2, w.b3) as half2.
  static __device__ __forceinline__ void run(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;
    const uint32_t a = __byte_perm(u, 0x64646464u, 0x4140);
    const uint32_t b = __byte_perm(u, 0x64646464u, 0x4342);
    const uint32_t magic = 0x64806480u;  // half2(1152, 1152)
    asm("sub.f16x2 %0, %1, %2;" : "=r"(lo) : "r"(a), "r"(magic));
    asm("sub.f16x2 %0, %1, %2;" : "=r"(hi) : "r"(b), "r"(magic));
  }
};

template <>
struct Dequant<__nv_bfloat16> {
  static __device__ __forceinline__ void run(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.f;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.f;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.f;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.f;
    // Small integers are exact in bf16: keep the high 16 bits of each float.
    lo = __byte_perm(__float_as_uint(f0), __float_as_uint(f1), 0x7632);
    hi = __byte_perm(__float_as_uint(f2), __float_as_uint(f3), 0x7632);
  }
};

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b);

template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Exact (erf) GeLU, as Pythia's hidden_act="gelu": gelu(y) = y * Phi(y), with the normal CDF
// Phi(y) = 1 - h for y >= 0 and h for y < 0, h = erfc(z) / 2, z = |y| / sqrt(2). erfc is fitted
// in the form of Press et al., Numerical Recipes (2nd ed., section 6.2), erfc(z) = t exp(-z^2 +
// P(t)) with t = 1 / (1 + c z), but with c = 0.3 and P of degree 7 (a least-squares fit, refined
// toward minimax, of log(erfc(z) e^{z^2} / t) on z in [0, 9.6]: |error| < 4.6e-7, so erfc's
// relative error is < 4.6e-7 there), instead of c = 1/2 and degree 9. Evaluated in base 2 with
// log2(e), 1/sqrt(2) and the 1/2 of h folded into the constants:
//   h = t * 2^(P2(t) - y^2 log2(e) / 2),   t = 1 / (1 + (c / sqrt 2) |y|).
// 13 FMA-pipe instructions and two MUFU (rcp, ex2) instead of 18 and two: at M = 2048 the
// GEMM's epilogue is not hidden behind memory, and there the GeLU's cost is those instructions
// (H100, mlp_up, linear_gelu vs linear on the same inputs, interleaved replays: the degree-9
// form +6.3%, a one-FMA stand-in for the GeLU +0.8%; docs/kernels.md). Against a float64
// reference (fp32 emulation, y in [-13.5, 10]): relative error < 1e-6 for |y| < 2, < 2.4e-6 for
// y in [-6, -2] and < 8.3e-6 further out (the degree-9 form: 6e-7, 4.1e-6, 1.8e-5), where
// 0.5 * y * (1 + erff(y / sqrt 2)) cancels to 0. +inf -> +inf; -inf and NaN -> NaN.
__device__ __forceinline__ float ex2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float rcp_approx(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float gelu_erf(float y) {
  // P2 = log2(e) * P, its constant term less 1 (the 1/2 of h), highest degree first.
  const float t = rcp_approx(fmaf(0.2121320367f, fabsf(y), 1.0f));  // c / sqrt(2) = 0.3 / sqrt(2)
  float p = 6.983062029e-01f;
  p = fmaf(p, t, -2.854059696e+00f);
  p = fmaf(p, t, 4.178664207e+00f);
  p = fmaf(p, t, -3.045162439e+00f);
  p = fmaf(p, t, 1.832053661e+00f);
  p = fmaf(p, t, 2.543781102e-01f);
  p = fmaf(p, t, 1.502238154e+00f);
  p = fmaf(p, t, -3.566418886e+00f);
  const float h = t * ex2_approx(fmaf(y * -0.7213475204f, y, p));  // -log2(e) / 2
  return y * (y >= 0.f ? 1.f - h : h);
}

template <bool GELU>
__device__ __forceinline__ float epilogue(float acc, float scale, float bias) {
  const float y = fmaf(acc, scale, bias);
  return GELU ? gelu_erf(y) : y;
}

__device__ __forceinline__ uint4 ldg_stream(const void* p) {
  // Weights are read once per call: don't let them evict x from L1.
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ uint4 ldg(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// ---------------------------------------------------------------------------------
// gemv: M <= 8 * NT. One block = 16 * CT output channels x its share of K; WARPS warps
// split that share in chunks of 128 (interleaved). Lane (g, t) = (lane / 4, lane % 4)
// loads, per chunk and half h, w[row 16c + g and 16c + g + 8][kb + 64h + 16t : +16] for
// each of its CT channel tiles c, and x[token 8j + g][same k]. For k16 step s of that
// half, its fragment's logical columns {2t, 2t+1, 2t+8, 2t+9} are the actual
// k = base + 4s + {0, 1, 2, 3} in both operands.
//
// CT = 2 (9-16 rows): each x fragment feeds the mmas of two channel tiles. With 16 channels a
// block, x ([M, K] fp16, re-read from L2 by every block) moved twice the weight bytes through
// L2 at M = 16; halving that measured ~4% faster on the wide shapes (L2 was not the main
// bound: two tiles take 118 registers, 2 blocks of 8 warps per SM; docs/kernels.md).
//
// KS > 1 (sm_90, thread-block clusters): the KS blocks of a cluster split the chunks of
// one channel tile, and the first block adds the others' partial sums, read from their
// shared memory (DSMEM) in rank order, so the result does not depend on the schedule.
// It keeps narrow problems (N = 2560: 80 tiles of 32 channels) spread over all SMs
// without a global workspace or a second kernel.
//
// One launch runs up to two problems (tiles [0, tiles0) the first, the rest the second:
// w8a16.linear_pair), and a problem may have two K segments with their own x, weight and
// scales whose products are summed (w8a16.linear_sum). The chunks of a problem are those of
// its first segment, then those of its second. Each chunk's partial sums are multiplied by
// their segment's scales as they are added to the accumulator, so the epilogue only adds the
// biases (and the GeLU).
template <typename T>
struct GemvSeg {
  const T* x;            // [M, K] contiguous, 16-byte aligned
  const int8_t* w;       // [N, K] contiguous, 16-byte aligned: int8, or T when the kernel's WB == 2
  const float* scales;   // [N]
  const T* bias;         // [N] or null
  int K;                 // 0: no such segment (or an empty reduction)
};
template <typename T>
struct GemvProblem {
  GemvSeg<T> seg[2];
  T* y;                  // [M, N]
  int N;
  int gelu;
};
// linear_sum_norm (one problem, two segments): y = residual + the sum, then two layer norms of
// y's rows (gemv_norm_tail). residual == nullptr: off.
template <typename T>
struct GemvNorm {
  const T* residual;     // [M, N]
  const T* w[2];         // [N] each
  const T* b[2];
  T* y[2];               // [M, N] each
  float eps;
  int* ws;               // [0]: arrivals, [1]: finished waiters (zero between calls); [4...]: partials
};
template <typename T>
struct GemvParams {
  GemvProblem<T> prob[2];
  int tiles0;            // channel tiles of the first problem: ceil(N / (16 * CT))
  int M;
  GemvNorm<T> norm;
  // How the kernel is launched (GemvLaunch).
  int early;
};
// GEMV_PLAIN: an ordinary launch (below sm_90, or W8A16_PDL=0). Otherwise a programmatic
// dependent launch (pdl.h), so that the kernel's blocks take the SM slots the previous kernel
// frees and start the moment it completes: GEMV_WAIT (every gemv launch without overlap)
// waits before any load; GEMV_EARLY (W8A16Linear2::overlap) reads weights, scales and (two
// segments) segment 1's x before it waits.
enum GemvLaunch { GEMV_PLAIN = 0, GEMV_EARLY = 1, GEMV_WAIT = 2 };

template <typename T, int NT, int CT, int UNROLL>
struct GemvRegs {
  uint4 w[UNROLL][2 * CT][2];  // [chunk][row: 16c + g, 16c + g + 8][half]
  uint4 x[UNROLL][NT][2][2];   // [chunk][token tile][half][16 B piece]
  float sc[UNROLL][2 * CT];    // [chunk][row]: the chunk's segment scales (NSEG == 2)
};

// What one thread needs of its block's problem, per segment: its weight rows, the base of x
// (global, or the block's shared-memory copy), its rows' scales, K.
template <typename T, int NT, int CT, int NSEG>
struct GemvThread {
  const int8_t* w[NSEG][2 * CT];  // [seg][row]
  const T* xrow[NSEG][NT];        // [seg][token tile]: row 8j + g of x (row 0 when it does not exist)
  bool xv[NT];                    // row 8j + g exists
  float sc[NSEG][2 * CT];         // [seg][row] (NSEG == 2; NSEG == 1 scales at the end)
  bool v[2 * CT];                 // the row exists
  int K[NSEG];
  int nch0, nchunks;              // chunks of segment 0; of all
  int t;
};

// Loads of one round (UNROLL chunks): per chunk and half, the weight pieces (LOAD_W), then
// the x fragments, from global memory (XG) or from x staged in shared memory (XS); XNONE: none.
enum GemvX { XNONE, XG, XS };

// log2 of the k a gemv chunk covers: a chunk is 128 bytes of each weight row, so 128 k of int8
// weights (WB = 1) or 64 k of 16-bit ones (WB = 2).
template <int WB>
constexpr int kGemvLogChunkK = WB == 1 ? 7 : 6;

template <bool LOAD_W, GemvX X, int WB, typename T, int NT, int CT, int UNROLL, int NSEG>
__device__ __forceinline__ void gemv_load(GemvRegs<T, NT, CT, UNROLL>& r, int c0, int stride,
                                          const GemvThread<T, NT, CT, NSEG>& th, int cend) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = c0 + u * stride;
    // The chunk's segment; selects, not indexing, keep th in registers.
    const bool s = NSEG == 2 && c >= th.nch0;
    const int K = s ? th.K[NSEG - 1] : th.K[0];
    constexpr int LOG_KC = kGemvLogChunkK<WB>, KC = 1 << LOG_KC;
    const int kb = (c - (s ? th.nch0 : 0)) << LOG_KC;
    if constexpr (LOAD_W && NSEG == 2) {
#pragma unroll
      for (int q = 0; q < 2 * CT; ++q) r.sc[u][q] = s ? th.sc[1][q] : th.sc[0][q];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int off = kb + (KC / 2) * h + (KC / 8) * th.t;  // a piece: 16 bytes of weight, 16 / WB k
      const bool ok = c < cend && off < K;  // K % 16 == 0: a piece is all in or all out
      if constexpr (LOAD_W) {
#pragma unroll
        for (int q = 0; q < 2 * CT; ++q) {
          const int8_t* wq = s ? th.w[NSEG - 1][q] : th.w[0][q];
          r.w[u][q][h] = (ok && th.v[q]) ? ldg_stream(wq + off * WB) : zero;
        }
      }
      if constexpr (X != XNONE) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const bool okx = ok && th.xv[j];
          const T* p = (s ? th.xrow[NSEG - 1][j] : th.xrow[0][j]) + off;
          // The piece's 16 / WB k of x: two 16-byte loads (int8 weights), or one.
#pragma unroll
          for (int e = 0; e < 2 / WB; ++e) {
            if constexpr (X == XG) {
              r.x[u][j][h][e] = okx ? ldg(p + 8 * e) : zero;
            } else {
              r.x[u][j][h][e] = okx ? *reinterpret_cast<const uint4*>(p + 8 * e) : zero;
            }
          }
        }
      }
    }
  }
}

// f(c, j, i) for each of a thread's accumulator fragment entries [CT][NT][4], fully unrolled.
template <int CT, int NT, typename F>
__device__ __forceinline__ void for_each_frag(F&& f) {
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) f(c, j, i);
}

// NSEG == 1: accumulates into acc (scaled once at the end); NSEG == 2: each chunk's partial
// sums are scaled by their segment's scales as they are added.
// WB == 2 (16-bit weights): a piece holds 8 k, two k16 steps, and its words are the A fragment
// as they are (no dequantization); the same logical k order as the int8 pieces' first two steps.
template <int NSEG, int WB, typename T, int NT, int CT, int UNROLL>
__device__ __forceinline__ void gemv_math(const GemvRegs<T, NT, CT, UNROLL>& r, float (&acc)[CT][NT][4]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    float part_[CT][NT][4];
    float (&part)[CT][NT][4] = NSEG == 2 ? part_ : acc;
    if constexpr (NSEG == 2) for_each_frag<CT, NT>([&](int c, int j, int i) { part[c][j][i] = 0.f; });
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int s = 0; s < 4 / WB; ++s) {
        uint32_t b[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&r.x[u][j][h][0]);  // 8 words
          b[j][0] = xw[2 * s];
          b[j][1] = xw[2 * s + 1];
        }
#pragma unroll
        for (int c = 0; c < CT; ++c) {
          const uint32_t* r0 = reinterpret_cast<const uint32_t*>(&r.w[u][2 * c][h]);
          const uint32_t* r1 = reinterpret_cast<const uint32_t*>(&r.w[u][2 * c + 1][h]);
          uint32_t a[4];
          if constexpr (WB == 1) {
            Dequant<T>::run(r0[s], a[0], a[2]);
            Dequant<T>::run(r1[s], a[1], a[3]);
          } else {
            a[0] = r0[2 * s];
            a[2] = r0[2 * s + 1];
            a[1] = r1[2 * s];
            a[3] = r1[2 * s + 1];
          }
#pragma unroll
          for (int j = 0; j < NT; ++j) mma16816<T>(part[c][j], a, b[j]);
        }
      }
    }
    // C fragment rows: c0, c1 row g; c2, c3 row g + 8.
    if constexpr (NSEG == 2) {
      for_each_frag<CT, NT>(
          [&](int c, int j, int i) { acc[c][j][i] = fmaf(part[c][j][i], r.sc[u][2 * c + (i >> 1)], acc[c][j][i]); });
    }
  }
}

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Register caps (__launch_bounds__ minimum blocks per SM), with at most 16 bytes of spill on
// sm_80 / sm_90: one segment, one channel tile, M <= 16: 64 registers (4 blocks); one segment,
// M > 16: 80 (3); two segments or two channel tiles (M = 9-16): 128 (2). Blocks of 4 warps
// (launch_gemv) ask for twice the blocks, so that the per-thread cap stays the same, except one
// 9-16-row case that asks for 5 (96 registers; see launch_gemv).
template <int NT, int CT, int NSEG>
constexpr int gemv_min_blocks() {
  return (NSEG == 2 || CT == 2) ? 2 : NT <= 2 ? 4 : 3;
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Chan et al.'s merge of two (count, mean, M2) summaries; the order of the merges is fixed by
// the callers, so the result does not depend on the schedule.
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
  const float tot = n + nb;
  if (tot == 0.f) return;
  const float d = meanb - mean;
  const float f = nb / tot;
  mean = fmaf(d, f, mean);
  m2 += m2b + d * d * n * f;
  n = tot;
}

// linear_sum_norm, after a rank-0 block has stored its tile of y = residual + sum (its rounded
// values also in vals[channel][token], channel < nch): the block writes its per-row (mean, M2)
// over its channels to the workspace and counts itself in. The last W = min(M, tiles) blocks to
// arrive wait for the rest (they can: every block ahead of them is running or done, and waiting
// blocks hold at most W <= 32 slots) and then normalise rows j, j + W, ... (j: their arrival
// rank among the W), with the mean and variance merged from every tile's partials in tile
// order. The last waiter to finish puts the two counters back to zero. No host sync, no second
// kernel, deterministic.
template <typename T, int NTOK>
__device__ void gemv_norm_tail(const GemvNorm<T>& nm, const T* y, const float* vals, int tile, int tiles, int n0,
                               int nch, int tile_ch, int M, int N) {
  int* ws = nm.ws;
  float* part = reinterpret_cast<float*>(ws + 4);  // [tile][32][2]: mean, M2 over the tile's channels
  __syncthreads();  // vals complete
  {  // one warp a row: lane c holds channel c (nch <= 32), fixed shuffle trees, lane 0 writes
    const int lane = threadIdx.x & 31;
    for (int m = threadIdx.x >> 5; m < M; m += blockDim.x >> 5) {
      const float v = lane < nch ? vals[lane * NTOK + m] : 0.f;
      float sum = v;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
      const float mean = __shfl_sync(0xffffffffu, sum, 0) / nch;
      const float d = lane < nch ? v - mean : 0.f;
      float m2 = d * d;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m2 += __shfl_down_sync(0xffffffffu, m2, o);
      if (lane == 0) {
        part[(tile * 32 + m) * 2] = mean;
        part[(tile * 32 + m) * 2 + 1] = m2;
      }
    }
  }
  __syncthreads();  // the block's y stores and partials, then one fence (cumulative) and the arrival
  __shared__ int arrival;
  if (threadIdx.x == 0) {
    __threadfence();
    arrival = atomicAdd(ws, 1);
  }
  __syncthreads();
  const int W = min(M, tiles);
  const int j = arrival - (tiles - W);
  if (j < 0) return;
  if (threadIdx.x == 0) {
    // Bounded (> 2 s): a workspace whose counters were not zero, or one shared by two launches
    // running at once, ends in a launch error instead of a hang.
    for (long long spins = 0; ld_acquire(ws) < tiles; ++spins) {
      if (spins > (1ll << 25)) __trap();
      __nanosleep(64);
    }
  }
  __syncthreads();
  __threadfence();
  __shared__ float stat[2];
  // Partials staged in shared memory (their loads all in flight at once), merged by warp 0.
  __shared__ float pst[2][256];
  const T* w0 = nm.w[0];
  const T* w1 = nm.w[1];
  const T* c0 = nm.b[0];
  const T* c1 = nm.b[1];
  for (int m = j; m < M; m += W) {
    float n = 0.f, mean = 0.f, m2 = 0.f;
    for (int t0 = 0; t0 < tiles; t0 += 256) {
      const int nt = min(256, tiles - t0);
      for (int t = threadIdx.x; t < nt; t += blockDim.x) {
        pst[0][t] = __ldcg(part + ((t0 + t) * 32 + m) * 2);
        pst[1][t] = __ldcg(part + ((t0 + t) * 32 + m) * 2 + 1);
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        for (int t = threadIdx.x; t < nt; t += 32)
          chan_merge(n, mean, m2, (float)min(tile_ch, N - (t0 + t) * tile_ch), pst[0][t], pst[1][t]);
      }
      __syncthreads();
    }
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {  // lane l merges lane l + o's (fixed tree; lane 0's result is used)
        const float n2 = __shfl_down_sync(0xffffffffu, n, o);
        const float mean2 = __shfl_down_sync(0xffffffffu, mean, o);
        const float m22 = __shfl_down_sync(0xffffffffu, m2, o);
        if (lane + o < 32) chan_merge(n, mean, m2, n2, mean2, m22);
      }
      if (lane == 0) {
        stat[0] = mean;
        stat[1] = rsqrtf(fmaxf(m2 / (float)N, 0.f) + nm.eps);
      }
    }
    __syncthreads();
    const float mu = stat[0], rstd = stat[1];
    const T* yr = y + (size_t)m * N;
    T* o0 = nm.y[0] + (size_t)m * N;
    T* o1 = nm.y[1] + (size_t)m * N;
    const bool vec = N % 8 == 0 && ((reinterpret_cast<uintptr_t>(yr) | reinterpret_cast<uintptr_t>(o0) |
                                     reinterpret_cast<uintptr_t>(o1) | reinterpret_cast<uintptr_t>(w0) |
                                     reinterpret_cast<uintptr_t>(w1) | reinterpret_cast<uintptr_t>(c0) |
                                     reinterpret_cast<uintptr_t>(c1)) & 15) == 0;
    if (vec) {  // 8 channels a thread per pass, every load of a pass issued before the math
      for (int v = threadIdx.x; v < N / 8; v += blockDim.x) {
        const uint4 yv = __ldcg(reinterpret_cast<const uint4*>(yr) + v);
        const uint4 g0 = __ldg(reinterpret_cast<const uint4*>(w0) + v);
        const uint4 g1 = __ldg(reinterpret_cast<const uint4*>(w1) + v);
        const uint4 b0 = __ldg(reinterpret_cast<const uint4*>(c0) + v);
        const uint4 b1 = __ldg(reinterpret_cast<const uint4*>(c1) + v);
        const T* ye = reinterpret_cast<const T*>(&yv);
        const T* g0e = reinterpret_cast<const T*>(&g0);
        const T* g1e = reinterpret_cast<const T*>(&g1);
        const T* b0e = reinterpret_cast<const T*>(&b0);
        const T* b1e = reinterpret_cast<const T*>(&b1);
        uint4 r0, r1;
        T* r0e = reinterpret_cast<T*>(&r0);
        T* r1e = reinterpret_cast<T*>(&r1);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float xn = (to_float<T>(ye[e]) - mu) * rstd;
          r0e[e] = from_float<T>(fmaf(xn, to_float<T>(g0e[e]), to_float<T>(b0e[e])));
          r1e[e] = from_float<T>(fmaf(xn, to_float<T>(g1e[e]), to_float<T>(b1e[e])));
        }
        reinterpret_cast<uint4*>(o0)[v] = r0;
        reinterpret_cast<uint4*>(o1)[v] = r1;
      }
    } else {
      for (int c = threadIdx.x; c < N; c += blockDim.x) {
        const float xn = (to_float<T>(__ldcg(yr + c)) - mu) * rstd;
        o0[c] = from_float<T>(fmaf(xn, to_float<T>(w0[c]), to_float<T>(c0[c])));
        o1[c] = from_float<T>(fmaf(xn, to_float<T>(w1[c]), to_float<T>(c1[c])));
      }
    }
    __syncthreads();  // stat is rewritten for the next row
  }
  if (threadIdx.x == 0) {
    // Every waiter has seen all arrivals before it counts itself here, so the reset is safe.
    if (atomicAdd(ws + 1, 1) == W - 1) {
      ws[1] = 0;
      ws[0] = 0;
    }
  }
}

// XSMEM: the problem's x (segment 0 [M, K0], then segment 1 [M, K1]) is first staged in shared
// memory, so each block reads it from L2 once and the x fragments need registers only during
// the math.
// NSEG: 1 when no problem of the launch has a second segment (linear, linear_pair), else 2:
// the per-chunk segment selection costs registers, hence occupancy.
// KS: blocks per cluster splitting K (1: no cluster; > 1 needs sm_90).
// NORM (NSEG == 2 only): linear_sum_norm's residual add and norms (gemv_norm_tail); its own
// instantiations, so that linear_sum's kernels keep their registers and shared memory.
// WB: bytes of a weight element, 1 (int8, dequantized in registers) or 2 (T: 16-bit weights,
// w8a16.linear's unquantized form). A chunk is 128 bytes of each weight row either way.
template <typename T, int WB, int NT, int CT, int WARPS, int UNROLL, bool XSMEM, int NSEG, int KS,
          int MINB = gemv_min_blocks<NT, CT, NSEG>() * 8 / WARPS, bool NORM = false>
__global__ void __launch_bounds__(WARPS * 32, MINB)
    gemv_kernel(const __grid_constant__ GemvParams<T> P) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (KS > 1) {  // never launched below sm_90 (the host checks)
    __trap();
  } else
#endif
  {
  // PDL (see pdl.h and GemvLaunch). Without `early` the kernel waits before any load; with
  // it, the first weights (and linear_sum's whole segment 1) are loaded before the wait, which
  // overlaps them with the tail of the previous kernel.
  const bool early = P.early == GEMV_EARLY;
  if (!early) pdl_wait_and_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = blockIdx.x / KS;
  const int rank = KS > 1 ? blockIdx.x % KS : 0;  // == the block's rank in its cluster
  const bool second = tile >= P.tiles0;
  const GemvProblem<T>& pr = second ? P.prob[1] : P.prob[0];
  const int N = pr.N, M = P.M;
  const int n0 = (tile - (second ? P.tiles0 : 0)) * 16 * CT;

  const int g = lane >> 2;
  GemvThread<T, NT, CT, NSEG> th;
  th.t = lane & 3;
#pragma unroll
  for (int q = 0; q < 2 * CT; ++q) th.v[q] = n0 + 8 * q + g < N;  // row q: channel n0 + 8q + g
#pragma unroll
  for (int j = 0; j < NT; ++j) th.xv[j] = 8 * j + g < M;
  extern __shared__ __align__(16) uint8_t gemv_smem[];
  const T* xs = reinterpret_cast<const T*>(gemv_smem);  // XSMEM: segment 0 [M, K0], segment 1 [M, K1]
#pragma unroll
  for (int s = 0; s < NSEG; ++s) {
    const GemvSeg<T>& sg = pr.seg[s];
    th.K[s] = sg.K;
#pragma unroll
    for (int q = 0; q < 2 * CT; ++q) {
      th.w[s][q] = sg.w + (size_t)(th.v[q] ? n0 + 8 * q + g : 0) * sg.K * WB;
      if constexpr (NSEG == 2) th.sc[s][q] = (th.v[q] && sg.K) ? sg.scales[n0 + 8 * q + g] : 0.f;
    }
    const T* xb = XSMEM ? xs : sg.x;
#pragma unroll
    for (int j = 0; j < NT; ++j) th.xrow[s][j] = xb + (size_t)(th.xv[j] ? 8 * j + g : 0) * sg.K;
    xs += (size_t)M * sg.K;
  }
  constexpr int LOG_KC = kGemvLogChunkK<WB>, KC = 1 << LOG_KC;
  th.nch0 = (th.K[0] + KC - 1) >> LOG_KC;
  th.nchunks = th.nch0;
  if constexpr (NSEG == 2) th.nchunks += (th.K[1] + KC - 1) >> LOG_KC;

  float acc[CT][NT][4];
  for_each_frag<CT, NT>([&](int c, int j, int i) { acc[c][j][i] = 0.f; });

  // The block's warps are virtual warps rank * WARPS + warp of the cluster.
  const int vw = rank * WARPS + warp;
  constexpr int STRIDE = WARPS * KS;
  // All UNROLL chunks' loads are issued before their math: decoding is latency-bound
  // as much as bandwidth-bound. (A register double-buffered variant, loading the next
  // round during this round's math, measured slower on H100: fewer warps fit per SM.)
  auto waited = [&]() {
    if (early) pdl_wait_and_trigger();
  };
  // Two segments run segment 1 first (linear_sum: the MLP down projection, whose input is
  // ready before the attention that precedes the call), with or without `early`, so that the
  // order of the fp32 sums, hence the result, does not depend on it.
  if constexpr (XSMEM) {
    GemvRegs<T, NT, CT, UNROLL> r;
    const uint32_t xs0 = static_cast<uint32_t>(__cvta_generic_to_shared(gemv_smem));
    auto stage = [&](int sb, int se) {  // x of segments [sb, se) into shared memory
      uint32_t dst = xs0;
#pragma unroll
      for (int s = 0; s < NSEG; ++s) {
        const int pieces = M * th.K[s] / 8;
        if (s >= sb && s < se)
          for (int i = threadIdx.x; i < pieces; i += WARPS * 32) cp_async16(dst + 16 * i, pr.seg[s].x + 8 * (size_t)i, true);
        dst += 16 * pieces;
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
    };
    auto run = [&](int cb, int ce) {  // chunks [cb, ce); the first round's weights are loaded
      for (int c0 = cb + vw; c0 < ce; c0 += STRIDE * UNROLL) {
        if (c0 != cb + vw) gemv_load<true, XNONE, WB>(r, c0, STRIDE, th, ce);
        gemv_load<false, XS, WB>(r, c0, STRIDE, th, ce);
        gemv_math<NSEG, WB>(r, acc);
      }
    };
    if constexpr (NSEG == 2) {
      gemv_load<true, XNONE, WB>(r, th.nch0 + vw, STRIDE, th, th.nchunks);
      stage(early ? 1 : 0, 2);
      run(th.nch0, th.nchunks);
      waited();
      gemv_load<true, XNONE, WB>(r, vw, STRIDE, th, th.nch0);
      if (early) stage(0, 1);
      run(0, th.nch0);
    } else {
      gemv_load<true, XNONE, WB>(r, vw, STRIDE, th, th.nchunks);  // the first weights, before x is staged
      waited();
      stage(0, 1);
      run(0, th.nchunks);
    }
  } else {
    // x from L2, each round's weight and x loads issued together (hoisting the first
    // round's weights ahead of x, as the staged path does, made M = 16 up to 1.5x slower
    // on H100).
    auto run = [&](int cb, int ce) {
      for (int c0 = cb + vw; c0 < ce; c0 += STRIDE * UNROLL) {
        GemvRegs<T, NT, CT, UNROLL> r;
        gemv_load<true, XG, WB>(r, c0, STRIDE, th, ce);
        gemv_math<NSEG, WB>(r, acc);
      }
    };
    if constexpr (NSEG == 2) run(th.nch0, th.nchunks);
    waited();
    run(0, th.nch0);
  }
  if constexpr (NSEG == 1) {
    const float* scales = pr.seg[0].scales;
#pragma unroll
    for (int c = 0; c < CT; ++c) {
      const float sc[2] = {th.v[2 * c] ? scales[n0 + 16 * c + g] : 0.f,
                           th.v[2 * c + 1] ? scales[n0 + 16 * c + g + 8] : 0.f};
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[c][j][i] *= sc[i >> 1];
    }
  }

  // Reduce the WARPS partial sums. C fragment: c0 (row g, col 2t), c1 (g, 2t+1),
  // c2 (g+8, 2t), c3 (g+8, 2t+1); rows are channels, columns tokens.
  constexpr int E = CT * NT * 4;  // accumulators per thread
  __shared__ float red[WARPS][E][32];
  for_each_frag<CT, NT>([&](int c, int j, int i) { red[warp][(c * NT + j) * 4 + i][lane] = acc[c][j][i]; });
  __syncthreads();
  __shared__ float part[KS > 1 ? E * 32 : 1];  // KS > 1: this block's sums, read by rank 0
  const T* b0 = pr.seg[0].bias;
  const T* b1 = NSEG == 2 ? pr.seg[1].bias : nullptr;
  T* y = pr.y;
  const bool gelu = pr.gelu;
  // linear_sum_norm: y's rounded values of this tile, [channel][token], for the row statistics.
  const T* resid = NORM ? P.norm.residual : nullptr;
  __shared__ float vals[NORM ? E * 32 : 1];
  auto store = [&](int e, float sum) {
    const int cji = e >> 5, l = e & 31;
    const int c = cji / (NT * 4), j = (cji >> 2) % NT, i = cji & 3;
    const int n = n0 + 16 * c + (l >> 2) + ((i & 2) ? 8 : 0);
    const int m = 8 * j + 2 * (l & 3) + (i & 1);
    if (n < N && m < M) {
      if (b0) sum += to_float<T>(b0[n]);
      if (b1) sum += to_float<T>(b1[n]);
      if (resid) sum += to_float<T>(resid[(size_t)m * N + n]);
      const T out = from_float<T>(gelu ? gelu_erf(sum) : sum);
      y[(size_t)m * N + n] = out;
      if constexpr (NORM) vals[(n - n0) * (8 * NT) + m] = to_float<T>(out);
    }
  };
  for (int e = threadIdx.x; e < E * 32; e += WARPS * 32) {
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) sum += red[wi][e >> 5][e & 31];
    if constexpr (KS == 1) {
      store(e, sum);
    } else {
      part[e] = sum;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (KS > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's part is written
    if (rank == 0) {
      for (int e = threadIdx.x; e < E * 32; e += WARPS * 32) {
        float sum = part[e];
#pragma unroll
        for (int r = 1; r < KS; ++r) sum += cluster.map_shared_rank(part, r)[e];
        store(e, sum);
      }
    }
    cluster.sync();  // keep every block's shared memory alive until rank 0 has read it
  }
#endif
  if constexpr (NORM) {
    if (rank == 0)
      gemv_norm_tail<T, 8 * NT>(P.norm, y, vals, tile, P.tiles0, n0, min(16 * CT, N - n0), 16 * CT, M, N);
  }
  }
}

// ---------------------------------------------------------------------------------
// gemm: M > 32.
constexpr int BM = 128, BN = 128, GEMM_THREADS = 256;
// The k-tile of split launches and of the split accounting (KSplit, gemm_splits).
constexpr int BK = 32;

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Tile shape of the gemm's k-loop: KB (k per shared-memory stage) and NS (stages).
// A tile: BM rows x KB halves = KB / 8 chunks of 16 B per row; B tile: BN rows x KB bytes =
// KB / 16 chunks. The chunks of a row are permuted by a row-dependent xor so that the 8 rows an
// ldmatrix phase (A) or a fragment load (B, 8 rows g = 0..7) reads hit distinct bank groups:
//   A, 4 chunks (64 B rows): c ^ ((r >> 1) & 3);   A, 8 chunks (128 B rows): c ^ (r & 7);
//   B, 2 chunks (32 B rows): c ^ ((r >> 2) & 1);   B, 4 chunks (64 B rows): c ^ ((r >> 1) & 3).
template <int KB, int NS>
struct GemmTile {
  static constexpr int kBK = KB, kStages = NS;
  static constexpr int CA = KB / 8, CB = KB / 16;
  static constexpr int A_STAGE = BM * KB * 2, B_STAGE = BN * KB;
  static constexpr int SMEM = NS * (A_STAGE + B_STAGE);
  static_assert(CA == 4 || CA == 8, "KB is 32 or 64");
  static __device__ __forceinline__ int a_offset(int row, int c) {
    return row * (KB * 2) + ((CA == 4 ? c ^ ((row >> 1) & 3) : c ^ (row & 7)) << 4);
  }
  static __device__ __forceinline__ int b_offset(int row, int c) {
    return row * KB + ((CB == 2 ? c ^ ((row >> 2) & 1) : c ^ ((row >> 1) & 3)) << 4);
  }
};

// Split-K (blockIdx.z = split, kt_split k-tiles of C::kBK each): with partial != nullptr the block
// writes its raw fp32 sums to partial[z][M][N] and gemm_splitk_reduce applies the epilogue, so
// split launches always use the GELU = false instantiation. H100, M = 128, mlp_up: the GELU = true
// kernel's main loop measured ~0.9 us slower than the GELU = false one (35.0 us), whether the GeLU
// was a template parameter or a runtime flag (which slowed linear to 36.1 us instead).
template <typename T, bool GELU, typename C>
__global__ void __launch_bounds__(GEMM_THREADS, 2)
    gemm_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ scales,
                const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K, int kt_split,
                float* __restrict__ partial) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sA = smem;
  uint8_t* sB = smem + C::kStages * C::A_STAGE;
  const uint32_t sA_u = static_cast<uint32_t>(__cvta_generic_to_shared(sA));
  const uint32_t sB_u = static_cast<uint32_t>(__cvta_generic_to_shared(sB));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64, cols wn*32
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int kt0 = blockIdx.z * kt_split;
  const int KT = min((K + C::kBK - 1) / C::kBK - kt0, kt_split);  // this split's k-tiles (> 0)

  auto load_stage = [&](int stage, int kt) {
    const int kb = (kt0 + kt) * C::kBK;
#pragma unroll
    for (int i = 0; i < BM * C::CA / GEMM_THREADS; ++i) {  // A: chunks of 8 halves
      const int q = tid + i * GEMM_THREADS;
      const int row = q / C::CA, c = q % C::CA;
      const int gm = m0 + row, gk = kb + c * 8;
      const bool ok = gm < M && gk < K;
      const T* src = x + (ok ? (size_t)gm * K + gk : 0);
      cp_async16(sA_u + stage * C::A_STAGE + C::a_offset(row, c), src, ok);
    }
#pragma unroll
    for (int i = 0; i < BN * C::CB / GEMM_THREADS; ++i) {  // B: chunks of 16 bytes
      const int q = tid + i * GEMM_THREADS;
      const int row = q / C::CB, c = q % C::CB;
      const int gn = n0 + row, gk = kb + c * 16;
      const bool ok = gn < N && gk < K;
      const int8_t* src = w + (ok ? (size_t)gn * K + gk : 0);
      cp_async16(sB_u + stage * C::B_STAGE + C::b_offset(row, c), src, ok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  const uint32_t sel = (t & 1) ? 0x7632u : 0x5410u;
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();
    {
      const int nk = kt + C::kStages - 1;
      if (nk < KT) load_stage(nk % C::kStages, nk);
      cp_async_commit();
    }
    const int stage = kt % C::kStages;
    const uint32_t aBase = sA_u + stage * C::A_STAGE;
    const uint8_t* bBase = sB + stage * C::B_STAGE;
#pragma unroll
    for (int s = 0; s < C::kBK / 16; ++s) {  // k16 steps per stage
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int row = wm * 64 + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], aBase + C::a_offset(row, s * 2 + (lane >> 4)));
      }
      uint32_t bf[4][2];
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int row = wn * 32 + ni * 8 + g;
        const uint8_t* p = bBase + C::b_offset(row, s) + 4 * (t >> 1);
        const uint32_t wa = *reinterpret_cast<const uint32_t*>(p);      // k 4(t/2) .. +3
        const uint32_t wb = *reinterpret_cast<const uint32_t*>(p + 8);  // k 8 + 4(t/2) .. +3
        // bytes k = 2t, 2t+1, 2t+8, 2t+9 of this k16 step: the B fragment's order.
        Dequant<T>::run(__byte_perm(wa, wb, sel), bf[ni][0], bf[ni][1]);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: c0 (row g, col 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1);
  // rows are tokens, columns channels.
  const bool pair_ok = (N & 1) == 0;
  if (partial) {
    float* P = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int n = n0 + wn * 32 + ni * 8 + 2 * t;
      if (n >= N) continue;
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int m = m0 + wm * 64 + mi * 16 + g + 8 * hr;
          if (m >= M) continue;
          float* dst = P + (size_t)m * N + n;
          if (pair_ok) {
            *reinterpret_cast<float2*>(dst) = make_float2(acc[mi][ni][2 * hr], acc[mi][ni][2 * hr + 1]);
          } else {
            dst[0] = acc[mi][ni][2 * hr];
            if (n + 1 < N) dst[1] = acc[mi][ni][2 * hr + 1];
          }
        }
    }
    return;
  }
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
    const int n = n0 + wn * 32 + ni * 8 + 2 * t;
    if (n >= N) continue;
    const bool has1 = n + 1 < N;
    const float s0 = scales[n], s1 = has1 ? scales[n + 1] : 0.f;
    const float b0 = bias ? to_float<T>(bias[n]) : 0.f;
    const float b1 = (bias && has1) ? to_float<T>(bias[n + 1]) : 0.f;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int m = m0 + wm * 64 + mi * 16 + g + 8 * hr;
        if (m >= M) continue;
        const T o0 = from_float<T>(epilogue<GELU>(acc[mi][ni][2 * hr], s0, b0));
        T* dst = y + (size_t)m * N + n;
        if (pair_ok) {
          const T o1 = from_float<T>(epilogue<GELU>(acc[mi][ni][2 * hr + 1], s1, b1));
          T pair[2] = {o0, o1};
          *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<uint32_t*>(pair);
        } else {
          dst[0] = o0;
          if (has1) dst[1] = from_float<T>(epilogue<GELU>(acc[mi][ni][2 * hr + 1], s1, b1));
        }
      }
    }
  }
}

// y = act(sum over z of partial[z] (in z order: deterministic) * scales + bias), 4 outputs a
// thread when N % 4 == 0 (partial's splits then stay 16-byte aligned), else 1. The loads of up
// to 4 splits are issued before they are added, so the kernel waits ~S / 4 L2 round trips.
template <int V>
struct SplitVec {
  float v[V];
  __device__ __forceinline__ void load(const float* p) {
    if constexpr (V == 4) {
      const float4 q = __ldcs(reinterpret_cast<const float4*>(p));
      v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    } else {
      v[0] = __ldcs(p);
    }
  }
  __device__ __forceinline__ void add(const SplitVec& o) {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] += o.v[j];
  }
};

template <typename T, bool GELU, int V>
__global__ void __launch_bounds__(256)
    gemm_splitk_reduce(const float* __restrict__ partial, int splits, const float* __restrict__ scales,
                       const T* __restrict__ bias, T* __restrict__ y, int M, int N) {
  const size_t MN = (size_t)M * N;
  for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i < MN;
       i += (size_t)gridDim.x * blockDim.x * V) {
    SplitVec<V> a;
    a.load(partial + i);
    for (int z = 1; z < splits; z += 4) {
      SplitVec<V> p[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (z + j < splits) p[j].load(partial + (size_t)(z + j) * MN + i);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (z + j < splits) a.add(p[j]);
    }
    const int n = (int)(i % N);
    T o[V];
#pragma unroll
    for (int j = 0; j < V; ++j)
      o[j] = from_float<T>(epilogue<GELU>(a.v[j], scales[n + j], bias ? to_float<T>(bias[n + j]) : 0.f));
    if constexpr (V == 4) {
      *reinterpret_cast<uint2*>(y + i) = *reinterpret_cast<const uint2*>(o);
    } else {
      y[i] = o[0];
    }
  }
}


template <typename T, int WB, int NT, int CT, int UNROLL, bool XSMEM, int NSEG, int KS, int WARPS, int MINB = 0,
          bool NORM = false>
cudaError_t launch_gemv_kernel(const GemvParams<T>& p, int tiles, size_t smem, cudaStream_t stream) {
  constexpr int minb = MINB > 0 ? MINB : gemv_min_blocks<NT, CT, NSEG>() * 8 / WARPS;
  auto kernel = gemv_kernel<T, WB, NT, CT, WARPS, UNROLL, XSMEM, NSEG, KS, minb, NORM>;
  const size_t bytes = XSMEM ? smem : 0;
  // GEMV_WAIT launches plainly at 9-16 rows in 4-warp blocks: there the programmatic launch made
  // mlp_up M = 16 (320 tiles, 4 blocks per SM) slower on H100, 13.2 -> 13.8-14.4 us.
  const bool pdl = p.early == GEMV_EARLY || (p.early == GEMV_WAIT && !(NT == 2 && WARPS == 4));
  return launch_kernel(kernel, dim3(tiles * KS), dim3(WARPS * 32), bytes, stream, pdl, KS, p);
}

// One or two segments, or linear_sum_norm (two segments and the norm tail).
// linear_sum_norm takes int8 weights only (its kernels are not built for WB == 2).
template <typename T, int WB, int NT, int CT, int UNROLL, bool XSMEM, int KS, int WARPS>
cudaError_t launch_segs(const GemvParams<T>& p, bool two, int tiles, size_t smem, cudaStream_t stream) {
  if constexpr (WB == 1) {
    if (p.norm.residual)
      return launch_gemv_kernel<T, WB, NT, CT, UNROLL, XSMEM, 2, KS, WARPS, 0, true>(p, tiles, smem, stream);
  } else {
    if (p.norm.residual) return cudaErrorInvalidValue;
  }
  return two ? launch_gemv_kernel<T, WB, NT, CT, UNROLL, XSMEM, 2, KS, WARPS>(p, tiles, smem, stream)
             : launch_gemv_kernel<T, WB, NT, CT, UNROLL, XSMEM, 1, KS, WARPS>(p, tiles, smem, stream);
}

// Warps per block (6, 8 or 10) of a one-segment gemv at <= 8 rows (NT == 1, no cluster). Each
// warp takes the chunks vw, vw + W, ... of its channel tile, UNROLL per round, and issues a
// round's loads before its math, so a block takes ceil(chunks / (W * UNROLL)) rounds of DRAM
// round trips; the launch takes ceil(tiles / slots) waves, slots = resident blocks per SM x SMs.
// Resident blocks: the launch bounds' register cap (gemv_min_blocks * 8 / W: 5, 4, 3), shared
// memory (reduction buffer, the 1 KB the runtime reserves, staged x), and at most kStagedXPerSm
// of staged x per SM (M = 8, 40 KB a block: 5 blocks an SM measured 6-27% slower than 3 or 4 on
// mlp_up, qkv, the LM head and linear_pair, though they fit). The pick: fewest waves x (rounds
// + 1) (a wave costs its rounds plus about one more for its blocks' start, x staging and
// reduction), then fewest waves, then most warps. A measured model, not a derived one: H100, M =
// 1-8, every Pythia-2.8B shape picks the fastest of 5, 6, 8 and 10 warps or one within 2% of it
// (4 warps was never the fastest). Until session 15 the launch took 8 warps, or 4 where 8 took
// more than a wave: M = 1, us, before -> after: mlp_up 13.3 -> 11.0 (6 warps), attn_out 5.1 ->
// 4.4 (10), mlp_down 12.9 -> 12.0 (10), linear_pair (qkv + mlp_up) 19.6 -> 17.5 (6), LM head
// 45.8 -> 44.9 (6), qkv 8.7 (8, unchanged); docs/kernels.md.
constexpr size_t kStagedXPerSm = 160 * 1024;
// Static shared memory of a one-segment gemv block: its reduction buffer, red[W][CT * NT * 4][32]
// floats (gemv_kernel), plus 64 bytes for the kernel's other static arrays (size 1 there).
constexpr size_t gemv_red_bytes(int warps, int ct, int nt) { return (size_t)warps * ct * nt * 4 * 32 * sizeof(float); }
template <int CT, int NT, int UNROLL>
int gemv_warps_small_m(int tiles, int chunks, size_t xsmem, const DeviceFacts& dev) {
  int best_w = 0;
  long long best_cost = 0, best_waves = 0;
  for (const int W : {6, 8, 10}) {
    const size_t red = gemv_red_bytes(W, CT, NT);
    // The staged x and the static shared memory must fit the 48 KB a block gets without opting in.
    if (xsmem + red > 48 * 1024) continue;
    long long blocks = gemv_min_blocks<NT, CT, 1>() * 8 / W;  // launch_gemv_kernel's register cap
    if (dev.smem_per_sm > 0) blocks = std::min<long long>(blocks, dev.smem_per_sm / (xsmem + red + 1024 + 64));
    if (xsmem > 0) blocks = std::min<long long>(blocks, kStagedXPerSm / xsmem);
    const long long slots = std::max(1LL, blocks) * dev.sms;
    const long long waves = (tiles + slots - 1) / slots;
    const long long cost = waves * ((chunks + W * UNROLL - 1) / (W * UNROLL) + 1);  // waves x (rounds + 1)
    // Ties: fewer waves, then more warps (W ascends, so a later W wins a full tie).
    if (best_w == 0 || cost < best_cost || (cost == best_cost && waves <= best_waves)) {
      best_w = W;
      best_cost = cost;
      best_waves = waves;
    }
  }
  return best_w;
}

// ks == 2 (thread-block clusters of two) is built for the 9-16-row tiles only, with 8 warps.
// Blocks of 4 warps instead of 8 (the same registers per thread, twice the blocks per SM) when
// the 8-warp grid would take more than one wave and the 4-warp one, at <= 8 rows, fits in one
// (and the staged x leaves room for the doubled blocks); at 9-16 rows whenever it takes more
// than one wave. One-segment launches at <= 8 rows take 6, 8 or 10 warps (gemv_warps_small_m).
// H100: mlp_up M = 1 14.1 -> 12.8 us (640 tiles, 528 slots of 8 warps; 11.0 with 6 warps),
// M = 16 16.1 -> 13.5 us, LM head M = 16 53.6 -> 50.3 us; with 4 warps everywhere, qkv M = 16
// (240 tiles) took 11.8 instead of 10.3 us, the LM head at M = 8 60.7 instead of 52.1 us.
template <typename T, int WB, int NT, int CT, int UNROLL, bool XSMEM = false>
cudaError_t launch_gemv(const GemvParams<T>& p, int tiles, int ks, int chunks, size_t smem, cudaStream_t stream,
                        const DeviceFacts& dev) {
  const bool two = p.prob[0].seg[1].K > 0 || p.prob[1].seg[1].K > 0 || p.norm.residual != nullptr;
  if constexpr (NT == 1) {
    if (!two && ks == 1) {
      switch (gemv_warps_small_m<CT, NT, UNROLL>(tiles, chunks, XSMEM ? smem : 0, dev)) {
        case 6: return launch_gemv_kernel<T, WB, NT, CT, UNROLL, XSMEM, 1, 1, 6>(p, tiles, smem, stream);
        case 10: return launch_gemv_kernel<T, WB, NT, CT, UNROLL, XSMEM, 1, 1, 10>(p, tiles, smem, stream);
        default: return launch_gemv_kernel<T, WB, NT, CT, UNROLL, XSMEM, 1, 1, 8>(p, tiles, smem, stream);
      }
    }
  }
  if constexpr (NT == 2 && CT == 2 && !XSMEM) {
    if (ks == 2) return launch_segs<T, WB, NT, CT, UNROLL, XSMEM, 2, 8>(p, two, tiles, smem, stream);
    // 9-16 rows, one segment (linear_pair's QKV + MLP-up at M = 16: 560 tiles, 1.06 waves of
    // 4-warp blocks at 4 per SM): capping registers at 96 fits 5 blocks per SM (4 bytes of spill
    // on sm_90), one wave. H100, M = 16: layer_in 24.2 -> 20.8 us, decode step at batch 16
    // 4.00 -> 3.89 ms. Only where it saves a wave: the LM head (1572 tiles, 2.98 -> 2.38 waves)
    // went 50.0 -> 53.7 us, and linear_sum (two segments, more spill) was slower in every
    // cluster / warp / cap combination tried.
    if (ks == 1 && !two && tiles > 4 * dev.sms && tiles <= 5 * dev.sms)
      return launch_gemv_kernel<T, WB, NT, CT, UNROLL, XSMEM, 1, 1, 4, 5>(p, tiles, smem, stream);
  }
  if constexpr (NT <= 2) {
    const int per_sm8 = two ? gemv_min_blocks<NT, CT, 2>() : gemv_min_blocks<NT, CT, 1>();
    const int slots8 = per_sm8 * dev.sms;
    constexpr size_t red4 = gemv_red_bytes(4, CT, NT);  // the 4-warp reduction buffer
    const bool room = !XSMEM || 2 * per_sm8 * ((XSMEM ? smem : 0) + red4 + 1024) <= 228 * 1024;
    if (ks == 1 && room && tiles > slots8 && (NT == 2 || tiles <= 2 * slots8))
      return launch_segs<T, WB, NT, CT, UNROLL, XSMEM, 1, 4>(p, two, tiles, smem, stream);
  }
  return launch_segs<T, WB, NT, CT, UNROLL, XSMEM, 1, 8>(p, two, tiles, smem, stream);
}

// Cluster size at 9-16 rows: two blocks split K when the channel tiles alone would leave SMs
// idle (fewer tiles than SMs) and K is long (>= 64 chunks of 128, 8 per warp). Measured on H100
// at M = 16: mlp_down 17.9 -> 15.3 us, linear_sum (attn_out + mlp_down) 20.0 -> 18.9 us; with
// K = 2560 (attn_out), at M = 1 (x staged once per block) and with clusters of 4 it was slower.
int gemv_splits(int M, int tiles, int chunks, const DeviceFacts& d) {
  return (d.clusters && M > 8 && M <= 16 && tiles < d.sms && chunks >= 64) ? 2 : 1;
}

// M <= 32: one gemv launch over the problems in p (prob[*].N set, tiles0 filled in here).
// WB: bytes of a weight element (1: int8, 2: 16-bit weights of type T).
template <typename T, int WB>
cudaError_t launch_gemv_params(GemvParams<T>& p, int nprob, cudaStream_t stream) {
  const int M = p.M;
  const DeviceFacts dev = device_facts();
  // Two channel tiles a block for 9-16 rows, where x's L2 traffic matters (see gemv_kernel);
  // at 17-32 rows the x fragments alone take 64 registers, and a second tile would spill.
  const int ct = (M > 8 && M <= 16) ? 2 : 1;
  int tiles = 0, chunks = INT32_MAX, max_chunks = 0;
  size_t xbytes = 0;  // the largest problem's x, both segments
  for (int i = 0; i < nprob; ++i) {
    const int t = (p.prob[i].N + 16 * ct - 1) / (16 * ct);
    if (i == 0) p.tiles0 = t;
    tiles += t;
    const int K = p.prob[i].seg[0].K + p.prob[i].seg[1].K;
    constexpr int KC = 1 << kGemvLogChunkK<WB>;
    const int c = (p.prob[i].seg[0].K + KC - 1) / KC + (p.prob[i].seg[1].K + KC - 1) / KC;
    chunks = std::min(chunks, c);
    max_chunks = std::max(max_chunks, c);
    xbytes = std::max(xbytes, (size_t)M * K * sizeof(T));
  }
  if (tiles == 0) return cudaSuccess;
  const int ks = gemv_splits(M, tiles, chunks, dev);
  // A programmatic dependent launch where the GPU has it (but see launch_gemv_kernel): back to
  // back (M = 1-8 on H100) that took qkv 10.6 -> 8.5 us, attn_out 6.0 -> 5.0 us, the LM head
  // 47.2 -> 46.0 us (docs/kernels.md, session 12).
  p.early = !dev.pdl() ? GEMV_PLAIN : p.early == GEMV_EARLY ? GEMV_EARLY : GEMV_WAIT;
  // x staged in shared memory when it fits (below) and the launch has more than two channel
  // tiles per SM. Staging pays where several blocks share an SM (one block's staging overlaps
  // the others' weight streams, and x leaves L2 once per block); with fewer, it sits on the
  // critical path. H100, session 12, M = 1-8, staged vs from L2: qkv (480 tiles) 8.4-8.8 vs
  // 9.2-9.3 us, the LM head at M <= 4 45.6-46.3 vs 47.2-47.9; attn_out (160 tiles) 5.0-5.3 vs
  // 4.9-5.0, mlp_down M = 2 14.3 vs 12.6, linear_sum (attn_out + mlp_down) M = 1 17.1 vs 16.2.
  cudaError_t e;
  // The staged x and the kernel's static shared memory must fit 48 KB together: the 8-warp
  // reduction buffer takes 4 KB (x up to 44 KB), linear_sum_norm's kernels 6.6 KB (the tile's
  // values, the staged partials; x up to 40 KB). (Until session 12 the first limit was 48 KB, and
  // x of 44-48 KB, e.g. M = 3 at K = 8192, failed to launch.)
  const size_t xmax = p.norm.residual ? 40 * 1024 : 44 * 1024;
  if (M <= 8 && xbytes <= xmax && tiles > 2 * dev.sms)
    e = launch_gemv<T, WB, 1, 1, 2, true>(p, tiles, ks, max_chunks, xbytes, stream, dev);
  else if (M <= 8)
    e = launch_gemv<T, WB, 1, 1, 2>(p, tiles, ks, max_chunks, 0, stream, dev);
  else if (M <= 16)
    e = launch_gemv<T, WB, 2, 2, 1>(p, tiles, ks, max_chunks, 0, stream, dev);
  else
    e = launch_gemv<T, WB, 4, 1, 1>(p, tiles, ks, max_chunks, 0, stream, dev);
  return e != cudaSuccess ? e : cudaGetLastError();
}

template <typename T>
GemvSeg<T> make_seg(const void* x, const int8_t* w, const float* scales, const void* bias, int K) {
  return GemvSeg<T>{static_cast<const T*>(x), w, scales, static_cast<const T*>(bias), K};
}

// Split-K for the gemm (M > 32) when its output tiles leave SMs idle or end in a partial wave:
// at M = 128 the 20 tiles of mlp_down (N = 2560) kept 20 of an H100's 132 SMs busy (187 us).
// A cost model picks the split count S (fitted to a sweep of S = 1-20 at M = 40-1024 on the
// Pythia-2.8B shapes, H100; its pick is the measured best or within 7% of it, docs/kernels.md):
//  * a block's k-tile (128 x 128 x 32) takes ~0.585 us with the SM to itself, ~0.5 us each when
//    two or more share an SM, and the busiest SM holds ceil(blocks / SMs) blocks;
//  * a split adds S * M * N * 4 bytes written and read back by gemm_splitk_reduce (~5 TB/s
//    through L2) and ~4 us (the second launch, the partial-tile writes).
// S is capped so that a split keeps >= 4 k-tiles and the workspace stays <= 256 MB.
// S splits asked for, of KT k-tiles: `kt` k-tiles a split, and the `used` splits that then hold
// any (S clamped to [1, KT]; the last split may be shorter).
struct KSplit {
  int kt, used;
  KSplit(int KT, int S) {
    S = std::max(1, std::min(S, KT));
    kt = (KT + S - 1) / S;
    used = (KT + kt - 1) / kt;
  }
};

double gemm_cost_us(int M, int N, int tiles, int KT, int S, int sms) {
  const KSplit ks(KT, S);
  const long long blocks = (long long)tiles * ks.used;
  const double body = blocks <= sms ? 0.585 * ks.kt : 0.5 * ks.kt * (double)((blocks + sms - 1) / sms);
  return body + (ks.used > 1 ? 4.0 + (double)ks.used * M * N * 8 / 5.0e6 : 0.0);
}

int gemm_splits(int M, int N, int K, const DeviceFacts& d) {
  const int tiles = ((N + BN - 1) / BN) * ((M + BM - 1) / BM);
  const int KT = (K + BK - 1) / BK;
  int best = 1;
  double best_cost = gemm_cost_us(M, N, tiles, KT, 1, d.sms);
  for (int S = 2; S <= 32 && KT / S >= 4 && (double)S * M * N * 4 <= 256.0 * (1 << 20); ++S) {
    const double c = gemm_cost_us(M, N, tiles, KT, S, d.sms);
    if (c < best_cost) best = S, best_cost = c;
  }
  return best;
}

template <typename T, bool GELU>
cudaError_t launch_splitk_reduce(const float* partial, int S, const float* scales, const void* bias, void* y,
                                 int M, int N, cudaStream_t stream, const DeviceFacts& dev) {
  const size_t MN = (size_t)M * N;
  const bool v4 = N % 4 == 0;
  const size_t threads = v4 ? MN / 4 : MN;
  const int blocks = (int)std::min<size_t>((threads + 255) / 256, (size_t)dev.sms * 8);
  if (v4)
    gemm_splitk_reduce<T, GELU, 4><<<blocks, 256, 0, stream>>>(partial, S, scales, static_cast<const T*>(bias),
                                                               static_cast<T*>(y), M, N);
  else
    gemm_splitk_reduce<T, GELU, 1><<<blocks, 256, 0, stream>>>(partial, S, scales, static_cast<const T*>(bias),
                                                               static_cast<T*>(y), M, N);
  return cudaGetLastError();
}

// `splits` blocks along z of `kt_split` k-tiles each, writing to `partial` when splits > 1.
template <typename T, bool GELU, typename C>
cudaError_t launch_gemm(const void* x, const int8_t* w, const float* scales, const void* bias, void* y, int M, int N,
                        int K, int splits, int kt_split, float* partial, cudaStream_t stream) {
  auto kernel = gemm_kernel<T, GELU, C>;
  // The attribute is per device; setting it is cheap and allowed during capture.
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess) return e;
  const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM, splits);
  kernel<<<grid, GEMM_THREADS, C::SMEM, stream>>>(static_cast<const T*>(x), w, scales, static_cast<const T*>(bias),
                                                  static_cast<T*>(y), M, N, K, kt_split, partial);
  return cudaGetLastError();
}

template <typename T, bool GELU>
cudaError_t launch(const void* x, const int8_t* w, const float* scales, const void* bias, void* y, int M, int N,
                   int K, int splits, float* workspace, int wbytes, cudaStream_t stream) {
  if (M <= 32) {
    GemvParams<T> p{};
    p.M = M;
    p.prob[0].seg[0] = make_seg<T>(x, w, scales, bias, K);
    p.prob[0].y = static_cast<T*>(y);
    p.prob[0].N = N;
    p.prob[0].gelu = GELU;
    return wbytes == 2 ? launch_gemv_params<T, 2>(p, 1, stream) : launch_gemv_params<T, 1>(p, 1, stream);
  }
  if (wbytes != 1) return cudaErrorInvalidValue;  // the gemm is int8 only
  const KSplit ks((K + BK - 1) / BK, workspace ? splits : 1);
  const int used = ks.used;
  // Unsplit launches take 64-wide k-tiles where two blocks of them (96 KB each) fit on an SM
  // (sm_90: 228 KB; not sm_80's 164 KB): half the barriers of the 32-wide tiles, and 4 k16 steps a
  // stage to interleave. H100, M = 2048, 7 replays each, two alternating runs: qkv 302 -> 273 us,
  // attn_out 123 -> 107, mlp_up 396 -> 357, LM head 1995 -> 1825 (results bit-identical: the k16
  // steps accumulate in the same order). Split launches keep the 32-wide tiles that gemm_splits'
  // cost model was fitted to.
  // W8A16_GEMM_KTILE=32 or 64 (read once per process) forces the width, for tests and A/B timing.
  using Wide = GemmTile<64, 4>;
  static const int forced = [] {
    const char* v = std::getenv("W8A16_GEMM_KTILE");
    return v == nullptr ? 0 : std::strcmp(v, "32") == 0 ? 32 : std::strcmp(v, "64") == 0 ? 64 : 0;
  }();
  const bool wide = forced ? forced == 64 : device_facts().smem_per_sm >= 2 * (Wide::SMEM + 1024);
  if (used == 1 && wide) return launch_gemm<T, GELU, Wide>(x, w, scales, bias, y, M, N, K, 1, INT_MAX, nullptr, stream);
  if (used == 1)
    return launch_gemm<T, GELU, GemmTile<32, 4>>(x, w, scales, bias, y, M, N, K, 1, INT_MAX, nullptr, stream);
  cudaError_t e = launch_gemm<T, false, GemmTile<32, 4>>(x, w, scales, bias, y, M, N, K, used, ks.kt, workspace, stream);
  if (e != cudaSuccess) return e;
  return launch_splitk_reduce<T, GELU>(workspace, used, scales, bias, y, M, N, stream, device_facts());
}

template <typename T>
cudaError_t launch2(const W8A16Linear2& a, int M, cudaStream_t stream) {
  GemvParams<T> p{};
  p.M = M;
  for (int i = 0; i < 2; ++i) {
    const int pi = a.sum ? 0 : i, si = a.sum ? i : 0;
    p.prob[pi].seg[si] = make_seg<T>(a.x[i], a.w[i], a.scales[i], a.bias[i], a.K[i]);
  }
  const int nprob = a.sum ? 1 : 2;
  p.early = a.overlap ? GEMV_EARLY : GEMV_WAIT;  // launch_gemv_params turns it into GEMV_PLAIN below sm_90
  if (a.sum && a.norm_y[0]) {
    p.norm.residual = static_cast<const T*>(a.residual);
    for (int i = 0; i < 2; ++i) {
      p.norm.w[i] = static_cast<const T*>(a.norm_w[i]);
      p.norm.b[i] = static_cast<const T*>(a.norm_b[i]);
      p.norm.y[i] = static_cast<T*>(a.norm_y[i]);
    }
    p.norm.eps = a.eps;
    p.norm.ws = a.workspace;
  }
  for (int i = 0; i < nprob; ++i) {
    p.prob[i].y = static_cast<T*>(a.y[i]);
    p.prob[i].N = a.N[i];
    p.prob[i].gelu = a.gelu[i];
  }
  return a.wbytes == 2 ? launch_gemv_params<T, 2>(p, nprob, stream) : launch_gemv_params<T, 1>(p, nprob, stream);
}

}  // namespace

int w8a16_linear_splits(int M, int N, int K, int requested) {
  if (M <= 32 || N == 0 || K == 0) return 1;
  return KSplit((K + BK - 1) / BK, requested > 0 ? requested : gemm_splits(M, N, K, device_facts())).used;
}

cudaError_t w8a16_linear(const void* x, const void* w, const float* scales, const void* bias, void* y,
                         int M, int N, int K, int dtype_code, bool gelu, int splits, float* workspace,
                         int wbytes, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (wbytes != 1 && wbytes != 2) return cudaErrorInvalidValue;
  const int8_t* wb = static_cast<const int8_t*>(w);
  if (dtype_code == 0)
    return gelu ? launch<__half, true>(x, wb, scales, bias, y, M, N, K, splits, workspace, wbytes, stream)
                : launch<__half, false>(x, wb, scales, bias, y, M, N, K, splits, workspace, wbytes, stream);
  return gelu ? launch<__nv_bfloat16, true>(x, wb, scales, bias, y, M, N, K, splits, workspace, wbytes, stream)
              : launch<__nv_bfloat16, false>(x, wb, scales, bias, y, M, N, K, splits, workspace, wbytes, stream);
}

cudaError_t w8a16_epilogue(const float* acc, const float* scales, const void* bias, void* y, int M, int N,
                           int dtype_code, bool gelu, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const DeviceFacts dev = device_facts();
  if (dtype_code == 0)
    return gelu ? launch_splitk_reduce<__half, true>(acc, 1, scales, bias, y, M, N, stream, dev)
                : launch_splitk_reduce<__half, false>(acc, 1, scales, bias, y, M, N, stream, dev);
  return gelu ? launch_splitk_reduce<__nv_bfloat16, true>(acc, 1, scales, bias, y, M, N, stream, dev)
              : launch_splitk_reduce<__nv_bfloat16, false>(acc, 1, scales, bias, y, M, N, stream, dev);
}

cudaError_t w8a16_linear2(const W8A16Linear2& args, int M, int dtype_code, cudaStream_t stream) {
  if (M <= 0 || M > 32) return M == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if ((args.wbytes != 1 && args.wbytes != 2) || (args.wbytes == 2 && args.norm_y[0])) return cudaErrorInvalidValue;
  return dtype_code == 0 ? launch2<__half>(args, M, stream) : launch2<__nv_bfloat16>(args, M, stream);
}
