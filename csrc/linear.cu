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
//    For M <= 8, x is staged once per block in shared memory when it fits in 48 KB
//    (M = 1 up to K = 24576): each block then reads x from L2 once, and the x
//    fragments take registers only during the math.
//    Measured on H100 and rejected: split-K over blocks with a last-block reduction,
//    register double-buffering, 16 warps per block (all slower than this); and
//    programmatic dependent launch (load the first weights, then griddepcontrol.wait
//    before x): 2.37 vs 2.14 ms per INT8 decode step, and the decoder's compiled and
//    eager tokens then differed (tests/model_patch/test_decoder.py), so it is not used.
//  * gemm (M > 32, prefill): 128x128x32 block tile, 8 warps of 64x32, 4-stage
//    cp.async pipeline, x through ldmatrix from an XOR-swizzled tile, int8 w
//    through 32-bit shared loads + one byte_perm that puts each thread's fragment
//    bytes together, then dequantized in registers. (Dequantizing each stage once
//    into a 16-bit tile read with ldmatrix measured no faster on H100.)
//
// int8 -> fp16 uses the FasterTransformer trick: bias the byte to unsigned with
// an xor, splice it under the exponent of 1024.0 (0x64) with byte_perm, subtract
// 1152 = 1024 + 128 with one sub.f16x2: 4 values in 5 instructions, exact.
// bf16 goes through fp32 (2^23 + u) - (2^23 + 128), exact, then keeps the high halves.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "linear.h"

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

// Exact (erf) GeLU, as Pythia's hidden_act="gelu".
__device__ __forceinline__ float gelu_erf(float y) { return 0.5f * y * (1.0f + erff(y * 0.70710678118654752440f)); }

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
// gemv: M <= 8 * NT. One block = 16 output channels x all of K; WARPS warps split K
// in chunks of 128 (interleaved). Lane (g, t) = (lane / 4, lane % 4) loads, per chunk
// and half h, w[row g and g + 8][kb + 64h + 16t : +16] and x[token 8j + g][same k].
// For k16 step s of that half, its fragment's logical columns {2t, 2t+1, 2t+8, 2t+9}
// are the actual k = base + 4s + {0, 1, 2, 3} in both operands.
//
// One launch runs up to two problems (blocks [0, tiles0) the first, the rest the second:
// w8a16.linear_pair), and a problem may have two K segments with their own x, weight and
// scales whose products are summed (w8a16.linear_sum). The chunks of a problem are those of
// its first segment, then those of its second. Each chunk's partial sums are multiplied by
// their segment's scales as they are added to the accumulator, so the epilogue only adds the
// biases (and the GeLU).
template <typename T>
struct GemvSeg {
  const T* x;            // [M, K] contiguous, 16-byte aligned
  const int8_t* w;       // [N, K] contiguous, 16-byte aligned
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
template <typename T>
struct GemvParams {
  GemvProblem<T> prob[2];
  int tiles0;            // blocks of the first problem: ceil(N / 16)
  int M;
};

template <typename T, int NT, int UNROLL>
struct GemvRegs {
  uint4 w[UNROLL][2][2];      // [chunk][row g / g+8][half]
  uint4 x[UNROLL][NT][2][2];  // [chunk][token tile][half][16 B piece]
  float sc[UNROLL][2];        // [chunk][row g / g+8]: the chunk's segment scales (NSEG == 2)
};

// What one thread needs of its block's problem, per segment: its two weight rows, the base
// of x (global, or the block's shared-memory copy), its rows' scales, K.
template <typename T, int NT, int NSEG>
struct GemvThread {
  const int8_t* w[NSEG][2];  // [seg][row g / g+8]
  const T* xrow[NSEG][NT];   // [seg][token tile]: row 8j + g of x (row 0 when it does not exist)
  bool xv[NT];               // row 8j + g exists
  float sc[NSEG][2];         // [seg][row g / g+8] (NSEG == 2; NSEG == 1 scales at the end)
  int K[NSEG];
  int nch0, nchunks;         // chunks of segment 0; of all
  bool v0, v1;               // rows g, g + 8 exist
  int t;
};

// Loads of one round (UNROLL chunks): per chunk and half, the two weight pieces (LOAD_W), then
// the x fragments, from global memory (XG) or from x staged in shared memory (XS); XNONE: none.
enum GemvX { XNONE, XG, XS };

template <bool LOAD_W, GemvX X, typename T, int NT, int UNROLL, int NSEG>
__device__ __forceinline__ void gemv_load(GemvRegs<T, NT, UNROLL>& r, int c0, int stride,
                                          const GemvThread<T, NT, NSEG>& th) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = c0 + u * stride;
    // The chunk's segment; selects, not indexing, keep th in registers.
    const bool s = NSEG == 2 && c >= th.nch0;
    const int K = s ? th.K[NSEG - 1] : th.K[0];
    const int kb = (c - (s ? th.nch0 : 0)) << 7;
    const int8_t* w0 = s ? th.w[NSEG - 1][0] : th.w[0][0];
    const int8_t* w1 = s ? th.w[NSEG - 1][1] : th.w[0][1];
    if constexpr (LOAD_W && NSEG == 2) {
      r.sc[u][0] = s ? th.sc[1][0] : th.sc[0][0];
      r.sc[u][1] = s ? th.sc[1][1] : th.sc[0][1];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int off = kb + 64 * h + 16 * th.t;
      const bool ok = c < th.nchunks && off < K;  // K % 16 == 0: a piece is all in or all out
      if constexpr (LOAD_W) {
        r.w[u][0][h] = (ok && th.v0) ? ldg_stream(w0 + off) : zero;
        r.w[u][1][h] = (ok && th.v1) ? ldg_stream(w1 + off) : zero;
      }
      if constexpr (X != XNONE) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const bool okx = ok && th.xv[j];
          const T* p = (s ? th.xrow[NSEG - 1][j] : th.xrow[0][j]) + off;
          if constexpr (X == XG) {
            r.x[u][j][h][0] = okx ? ldg(p) : zero;
            r.x[u][j][h][1] = okx ? ldg(p + 8) : zero;
          } else {
            r.x[u][j][h][0] = okx ? *reinterpret_cast<const uint4*>(p) : zero;
            r.x[u][j][h][1] = okx ? *reinterpret_cast<const uint4*>(p + 8) : zero;
          }
        }
      }
    }
  }
}

// NSEG == 1: accumulates into acc (scaled once at the end); NSEG == 2: each chunk's partial
// sums are scaled by their segment's scales as they are added.
template <int NSEG, typename T, int NT, int UNROLL>
__device__ __forceinline__ void gemv_math(const GemvRegs<T, NT, UNROLL>& r, float (&acc)[NT][4]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    float part_[NT][4];
    float (&part)[NT][4] = NSEG == 2 ? part_ : acc;
    if constexpr (NSEG == 2) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[j][i] = 0.f;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t* r0 = reinterpret_cast<const uint32_t*>(&r.w[u][0][h]);
      const uint32_t* r1 = reinterpret_cast<const uint32_t*>(&r.w[u][1][h]);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint32_t a[4];
        Dequant<T>::run(r0[s], a[0], a[2]);
        Dequant<T>::run(r1[s], a[1], a[3]);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&r.x[u][j][h][0]);  // 8 words
          const uint32_t b[2] = {xw[2 * s], xw[2 * s + 1]};
          mma16816<T>(part[j], a, b);
        }
      }
    }
    // C fragment rows: c0, c1 row g; c2, c3 row g + 8.
    if constexpr (NSEG == 2) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = fmaf(part[j][i], r.sc[u][i >> 1], acc[j][i]);
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

// XSMEM: the problem's x (segment 0 [M, K0], then segment 1 [M, K1]) is first staged in shared
// memory, so each block reads it from L2 once and the x fragments need registers only during
// the math.
// NSEG: 1 when no problem of the launch has a second segment (linear, linear_pair), else 2:
// the per-chunk segment selection costs registers, hence occupancy.
// Register caps (__launch_bounds__ minimum blocks per SM), with at most 16 bytes of spill on
// sm_80 / sm_90: one segment, M <= 16: 64 registers (4 blocks); one segment, M > 16: 80 (3);
// two segments: 128 (2; linear_sum's N = 2560 launches only 160 blocks).
template <typename T, int NT, int WARPS, int UNROLL, bool XSMEM, int NSEG>
__global__ void __launch_bounds__(WARPS * 32, NSEG == 2 ? 2 : NT <= 2 ? 4 : 3) gemv_kernel(const __grid_constant__ GemvParams<T> P) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool second = blockIdx.x >= P.tiles0;
  const GemvProblem<T>& pr = second ? P.prob[1] : P.prob[0];
  const int N = pr.N, M = P.M;
  const int n0 = (blockIdx.x - (second ? P.tiles0 : 0)) * 16;

  const int g = lane >> 2;
  GemvThread<T, NT, NSEG> th;
  th.t = lane & 3;
  th.v0 = n0 + g < N;
  th.v1 = n0 + g + 8 < N;
#pragma unroll
  for (int j = 0; j < NT; ++j) th.xv[j] = 8 * j + g < M;
  extern __shared__ __align__(16) uint8_t gemv_smem[];
  const T* xs = reinterpret_cast<const T*>(gemv_smem);  // XSMEM: segment 0 [M, K0], segment 1 [M, K1]
#pragma unroll
  for (int s = 0; s < NSEG; ++s) {
    const GemvSeg<T>& sg = pr.seg[s];
    th.K[s] = sg.K;
    th.w[s][0] = sg.w + (size_t)(th.v0 ? n0 + g : 0) * sg.K;
    th.w[s][1] = sg.w + (size_t)(th.v1 ? n0 + g + 8 : 0) * sg.K;
    if constexpr (NSEG == 2) {
      th.sc[s][0] = (th.v0 && sg.K) ? sg.scales[n0 + g] : 0.f;
      th.sc[s][1] = (th.v1 && sg.K) ? sg.scales[n0 + g + 8] : 0.f;
    }
    const T* xb = XSMEM ? xs : sg.x;
#pragma unroll
    for (int j = 0; j < NT; ++j) th.xrow[s][j] = xb + (size_t)(th.xv[j] ? 8 * j + g : 0) * sg.K;
    xs += (size_t)M * sg.K;
  }
  th.nch0 = (th.K[0] + 127) >> 7;
  th.nchunks = th.nch0;
  if constexpr (NSEG == 2) th.nchunks += (th.K[1] + 127) >> 7;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  // All UNROLL chunks' loads are issued before their math: decoding is latency-bound
  // as much as bandwidth-bound. (A register double-buffered variant, loading the next
  // round during this round's math, measured slower on H100: fewer warps fit per SM.)
  if constexpr (XSMEM) {
    GemvRegs<T, NT, UNROLL> r;
    gemv_load<true, XNONE>(r, warp, WARPS, th);  // the first weights, before x is staged
    const uint32_t xs = static_cast<uint32_t>(__cvta_generic_to_shared(gemv_smem));
    uint32_t dst = xs;
#pragma unroll
    for (int s = 0; s < NSEG; ++s) {
      const int pieces = M * th.K[s] / 8;
      for (int i = threadIdx.x; i < pieces; i += WARPS * 32) cp_async16(dst + 16 * i, pr.seg[s].x + 8 * (size_t)i, true);
      dst += 16 * pieces;
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    for (int c0 = warp; c0 < th.nchunks; c0 += WARPS * UNROLL) {
      if (c0 != warp) gemv_load<true, XNONE>(r, c0, WARPS, th);
      gemv_load<false, XS>(r, c0, WARPS, th);
      gemv_math<NSEG>(r, acc);
    }
  } else {
    // x from L2, each round's weight and x loads issued together (hoisting the first
    // round's weights ahead of x, as the staged path does, made M = 16 up to 1.5x slower
    // on H100).
    for (int c0 = warp; c0 < th.nchunks; c0 += WARPS * UNROLL) {
      GemvRegs<T, NT, UNROLL> r;
      gemv_load<true, XG>(r, c0, WARPS, th);
      gemv_math<NSEG>(r, acc);
    }
  }
  if constexpr (NSEG == 1) {
    const float* scales = pr.seg[0].scales;
    const float sc[2] = {th.v0 ? scales[n0 + g] : 0.f, th.v1 ? scales[n0 + g + 8] : 0.f};
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] *= sc[i >> 1];
  }

  // Reduce the WARPS partial sums. C fragment: c0 (row g, col 2t), c1 (g, 2t+1),
  // c2 (g+8, 2t), c3 (g+8, 2t+1); rows are channels, columns tokens.
  __shared__ float red[WARPS][NT * 4][32];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][j * 4 + i][lane] = acc[j][i];
  __syncthreads();
  const T* b0 = pr.seg[0].bias;
  const T* b1 = NSEG == 2 ? pr.seg[1].bias : nullptr;
  T* y = pr.y;
  const bool gelu = pr.gelu;
  for (int e = threadIdx.x; e < NT * 4 * 32; e += WARPS * 32) {
    const int ji = e >> 5, l = e & 31;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) sum += red[wi][ji][l];
    const int j = ji >> 2, i = ji & 3;
    const int n = n0 + (l >> 2) + ((i & 2) ? 8 : 0);
    const int m = 8 * j + 2 * (l & 3) + (i & 1);
    if (n < N && m < M) {
      if (b0) sum += to_float<T>(b0[n]);
      if (b1) sum += to_float<T>(b1[n]);
      y[(size_t)m * N + n] = from_float<T>(gelu ? gelu_erf(sum) : sum);
    }
  }
}

// ---------------------------------------------------------------------------------
// gemm: M > 32.
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, GEMM_THREADS = 256;
constexpr int A_STAGE_BYTES = BM * BK * 2;  // fp16/bf16
constexpr int B_STAGE_BYTES = BN * BK;      // int8
constexpr int GEMM_SMEM = STAGES * (A_STAGE_BYTES + B_STAGE_BYTES);


__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// A tile: BM rows x BK halves = 4 chunks of 16 B per row; chunk c of row r lives
// at chunk c ^ ((r >> 1) & 3), so ldmatrix's 8 row reads hit 8 distinct bank groups.
__device__ __forceinline__ int a_offset(int row, int chunk) {
  return row * (BK * 2) + ((chunk ^ ((row >> 1) & 3)) << 4);
}
// B tile: BN rows x BK bytes = 2 chunks per row; flipping the chunk of rows 4-7
// (mod 8) makes the fragment reads of 8 rows conflict-free.
__device__ __forceinline__ int b_offset(int row, int chunk) {
  return row * BK + ((chunk ^ ((row >> 2) & 1)) << 4);
}

template <typename T, bool GELU>
__global__ void __launch_bounds__(GEMM_THREADS, 2)
    gemm_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ scales,
                const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sA = smem;
  uint8_t* sB = smem + STAGES * A_STAGE_BYTES;
  const uint32_t sA_u = static_cast<uint32_t>(__cvta_generic_to_shared(sA));
  const uint32_t sB_u = static_cast<uint32_t>(__cvta_generic_to_shared(sB));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64, cols wn*32
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int KT = (K + BK - 1) / BK;

  auto load_stage = [&](int stage, int kt) {
    const int kb = kt * BK;
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // A: 512 chunks of 8 halves
      const int q = tid + i * GEMM_THREADS;
      const int row = q >> 2, c = q & 3;
      const int gm = m0 + row, gk = kb + c * 8;
      const bool ok = gm < M && gk < K;
      const T* src = x + (ok ? (size_t)gm * K + gk : 0);
      cp_async16(sA_u + stage * A_STAGE_BYTES + a_offset(row, c), src, ok);
    }
    {  // B: 256 chunks of 16 bytes
      const int row = tid >> 1, c = tid & 1;
      const int gn = n0 + row, gk = kb + c * 16;
      const bool ok = gn < N && gk < K;
      const int8_t* src = w + (ok ? (size_t)gn * K + gk : 0);
      cp_async16(sB_u + stage * B_STAGE_BYTES + b_offset(row, c), src, ok);
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
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  const uint32_t sel = (t & 1) ? 0x7632u : 0x5410u;
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nk = kt + STAGES - 1;
      if (nk < KT) load_stage(nk % STAGES, nk);
      cp_async_commit();
    }
    const int stage = kt % STAGES;
    const uint32_t aBase = sA_u + stage * A_STAGE_BYTES;
    const uint8_t* bBase = sB + stage * B_STAGE_BYTES;
#pragma unroll
    for (int s = 0; s < 2; ++s) {  // two k16 steps per BK = 32
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int row = wm * 64 + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], aBase + a_offset(row, s * 2 + (lane >> 4)));
      }
      uint32_t bf[4][2];
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int row = wn * 32 + ni * 8 + g;
        const uint8_t* p = bBase + b_offset(row, s) + 4 * (t >> 1);
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

template <typename T, int NT, int UNROLL, bool XSMEM = false>
void launch_gemv(const GemvParams<T>& p, int tiles, size_t smem, cudaStream_t stream) {
  constexpr int WARPS = 8;
  const size_t bytes = XSMEM ? smem : 0;
  if (p.prob[0].seg[1].K > 0 || p.prob[1].seg[1].K > 0)
    gemv_kernel<T, NT, WARPS, UNROLL, XSMEM, 2><<<tiles, WARPS * 32, bytes, stream>>>(p);
  else
    gemv_kernel<T, NT, WARPS, UNROLL, XSMEM, 1><<<tiles, WARPS * 32, bytes, stream>>>(p);
}

// M <= 32: one gemv launch over the problems in p.
template <typename T>
cudaError_t launch_gemv_params(const GemvParams<T>& p, int tiles, cudaStream_t stream) {
  const int M = p.M;
  if (tiles == 0) return cudaSuccess;
  size_t xbytes = 0;  // the largest problem's x, both segments
  for (int i = 0; i < 2; ++i)
    xbytes = std::max(xbytes, (size_t)M * (p.prob[i].seg[0].K + p.prob[i].seg[1].K) * sizeof(T));
  // x staged in shared memory when it fits the default 48 KB (M = 1 up to K = 24576):
  // measured on H100 at M = 1, 3-8% faster per shape than x from L2 (2 or 3 chunks per round,
  // or 4 staged, were no better).
  if (M <= 8 && xbytes <= 48 * 1024)
    launch_gemv<T, 1, 2, true>(p, tiles, xbytes, stream);
  else if (M <= 8)
    launch_gemv<T, 1, 2>(p, tiles, 0, stream);
  else if (M <= 16)
    launch_gemv<T, 2, 2>(p, tiles, 0, stream);
  else
    launch_gemv<T, 4, 1>(p, tiles, 0, stream);
  return cudaGetLastError();
}

template <typename T>
GemvSeg<T> make_seg(const void* x, const int8_t* w, const float* scales, const void* bias, int K) {
  return GemvSeg<T>{static_cast<const T*>(x), w, scales, static_cast<const T*>(bias), K};
}

template <typename T, bool GELU>
cudaError_t launch(const void* x, const int8_t* w, const float* scales, const void* bias, void* y, int M, int N,
                   int K, cudaStream_t stream) {
  if (M <= 32) {
    GemvParams<T> p{};
    p.M = M;
    p.prob[0].seg[0] = make_seg<T>(x, w, scales, bias, K);
    p.prob[0].y = static_cast<T*>(y);
    p.prob[0].N = N;
    p.prob[0].gelu = GELU;
    p.tiles0 = (N + 15) / 16;
    return launch_gemv_params(p, p.tiles0, stream);
  }
  // The attribute is per device; setting it is cheap and allowed during capture.
  cudaError_t e =
      cudaFuncSetAttribute(gemm_kernel<T, GELU>, cudaFuncAttributeMaxDynamicSharedMemorySize, GEMM_SMEM);
  if (e != cudaSuccess) return e;
  const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
  gemm_kernel<T, GELU><<<grid, GEMM_THREADS, GEMM_SMEM, stream>>>(
      static_cast<const T*>(x), w, scales, static_cast<const T*>(bias), static_cast<T*>(y), M, N, K);
  return cudaGetLastError();
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
  int tiles = 0;
  for (int i = 0; i < nprob; ++i) {
    p.prob[i].y = static_cast<T*>(a.y[i]);
    p.prob[i].N = a.N[i];
    p.prob[i].gelu = a.gelu[i];
    if (i == 0) p.tiles0 = (a.N[0] + 15) / 16;
    tiles += (a.N[i] + 15) / 16;
  }
  return launch_gemv_params(p, tiles, stream);
}

}  // namespace

cudaError_t w8a16_linear(const void* x, const int8_t* w, const float* scales, const void* bias, void* y,
                         int M, int N, int K, int dtype_code, bool gelu, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (dtype_code == 0)
    return gelu ? launch<__half, true>(x, w, scales, bias, y, M, N, K, stream)
                : launch<__half, false>(x, w, scales, bias, y, M, N, K, stream);
  return gelu ? launch<__nv_bfloat16, true>(x, w, scales, bias, y, M, N, K, stream)
              : launch<__nv_bfloat16, false>(x, w, scales, bias, y, M, N, K, stream);
}

cudaError_t w8a16_linear2(const W8A16Linear2& args, int M, int dtype_code, cudaStream_t stream) {
  if (M <= 0 || M > 32) return M == 0 ? cudaSuccess : cudaErrorInvalidValue;
  return dtype_code == 0 ? launch2<__half>(args, M, stream) : launch2<__nv_bfloat16>(args, M, stream);
}
