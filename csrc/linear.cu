// W8A16 linear: y[M, N] = act((x[M, K] @ w[N, K]^T) * scales[N] + bias[N]).
//
// x is fp16 or bf16, w int8 (row-major, as stored by torch), scales fp32, fp32
// accumulation on tensor cores (mma.sync.m16n8k16), dequantization in registers
// and scale / bias / exact-erf GeLU in the epilogue. No torch headers here: this
// file compiles in seconds; csrc/ops.cpp does the checks and the dispatch.
//
// Two kernels:
//  * gemv (M <= 32, decoding): "swap AB", split-K over blocks. The weight tile is the mma A operand
//    (16 output channels x 16 k), the activations are B (16 k x 8 tokens). Each
//    thread loads 16 contiguous weight bytes of one row straight from global
//    memory. A dot product does not depend on the order of k, so we *define* the
//    fragment's logical k order to be the one the contiguous load gives, and feed
//    x in the same order: no shuffles, no shared memory, 16-byte loads for both.
//    Warps of a block split K; one reduction through shared memory at the end.
//  * gemm (M > 32, prefill): 128x128x32 block tile, 8 warps of 64x32, 4-stage
//    cp.async pipeline, x through ldmatrix from an XOR-swizzled tile, int8 w
//    through 32-bit shared loads + one byte_perm that puts each thread's fragment
//    bytes together, then dequantized in registers.
//
// int8 -> fp16 uses the FasterTransformer trick: bias the byte to unsigned with
// an xor, splice it under the exponent of 1024.0 (0x64) with byte_perm, subtract
// 1152 = 1024 + 128 with one sub.f16x2: 4 values in 5 instructions, exact.
// bf16 goes through fp32 (2^23 + u) - (2^23 + 128), exact, then keeps the high halves.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

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

template <bool GELU>
__device__ __forceinline__ float epilogue(float acc, float scale, float bias) {
  float y = fmaf(acc, scale, bias);
  if (GELU) y = 0.5f * y * (1.0f + erff(y * 0.70710678118654752440f));
  return y;
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
// gemv: M <= 8 * NT. A block has 4 warps; warp w owns 16 output channels
// (n0 = 64 * blockIdx.x + 16 * w) and the block's range of K chunks (128 wide),
// so the 4 warps read the same x and share it through L1. Lane (g, t) =
// (lane / 4, lane % 4) loads, per chunk and half h, w[row g and g + 8][kb + 64h +
// 16t : +16] and x[token 8j + g][same k range]. For k16 step s of that half, its
// fragment's logical columns {2t, 2t+1, 2t+8, 2t+9} are the actual k = base + 4s +
// {0, 1, 2, 3} in both operands.
// Split-K: a row block is cut into gridDim.y ranges of K so that every launch has
// about 8 blocks per SM (160 row blocks on 132 SMs would leave some SMs with
// twice the bytes of others). Each block stores its fp32 partial tile; the last
// block of a row block to finish (an atomic counter) adds the partials in split
// order -- deterministic -- runs the epilogue and resets the counter to zero.
constexpr int GEMV_WARPS = 4;
constexpr int GEMV_ROWS = 16 * GEMV_WARPS;

template <typename T, int NT, int UNROLL, bool GELU>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ scales,
                const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K, int chunks_per_block,
                float* __restrict__ partials, int* __restrict__ counters) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * GEMV_ROWS + warp * 16;
  const int nchunks = (K + 127) >> 7;
  const int c_begin = blockIdx.y * chunks_per_block;
  const int c_end = min(nchunks, c_begin + chunks_per_block);
  const bool v0 = n0 + g < N, v1 = n0 + g + 8 < N;
  const int8_t* w0 = w + (size_t)(v0 ? n0 + g : 0) * K;
  const int8_t* w1 = w + (size_t)(v1 ? n0 + g + 8 : 0) * K;
  const T* xrow[NT];
  bool xv[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    xv[j] = 8 * j + g < M;
    xrow[j] = x + (size_t)(xv[j] ? 8 * j + g : 0) * K;
  }

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int c0 = c_begin; c0 < c_end; c0 += UNROLL) {
    uint4 wa[UNROLL][2][2];      // [chunk][row g / g+8][half]
    uint4 xa[UNROLL][NT][2][2];  // [chunk][token tile][half][16 B piece]
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = c0 + u;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int off = (c << 7) + 64 * h + 16 * t;
        const bool ok = c < c_end && off < K;  // K % 16 == 0: a piece is all in or all out
        wa[u][0][h] = (ok && v0) ? ldg_stream(w0 + off) : zero;
        wa[u][1][h] = (ok && v1) ? ldg_stream(w1 + off) : zero;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const bool okx = ok && xv[j];
          xa[u][j][h][0] = okx ? ldg(xrow[j] + off) : zero;
          xa[u][j][h][1] = okx ? ldg(xrow[j] + off + 8) : zero;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t* r0 = reinterpret_cast<const uint32_t*>(&wa[u][0][h]);
        const uint32_t* r1 = reinterpret_cast<const uint32_t*>(&wa[u][1][h]);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t a[4];
          Dequant<T>::run(r0[s], a[0], a[2]);
          Dequant<T>::run(r1[s], a[1], a[3]);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xa[u][j][h][0]);  // 8 words
            const uint32_t b[2] = {xw[2 * s], xw[2 * s + 1]};
            mma16816<T>(acc[j], a, b);
          }
        }
      }
    }
  }

  if (gridDim.y > 1) {
    constexpr int TILE = NT * 4 * 32;  // floats per warp tile, stored [j*4+i][lane]: coalesced
    float* mine = partials + ((size_t)(blockIdx.y * gridDim.x + blockIdx.x) * GEMV_WARPS + warp) * TILE;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) mine[(j * 4 + i) * 32 + lane] = acc[j][i];
    __threadfence();
    __syncthreads();
    __shared__ int is_last;
    if (threadIdx.x == 0) is_last = atomicAdd(&counters[blockIdx.x], 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
    for (int sp = 0; sp < (int)gridDim.y; ++sp) {
      const float* p = partials + ((size_t)(sp * gridDim.x + blockIdx.x) * GEMV_WARPS + warp) * TILE;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] += __ldcg(p + (j * 4 + i) * 32 + lane);
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
  }

  // Epilogue. C fragment: c0 (row g, col 2t), c1 (g, 2t+1), c2 (g+8, 2t),
  // c3 (g+8, 2t+1); rows are channels, columns tokens.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n = n0 + g + ((i & 2) ? 8 : 0);
    if (n >= N) continue;
    const float sc = scales[n];
    const float b = bias ? to_float<T>(bias[n]) : 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int m = 8 * j + 2 * t + (i & 1);
      if (m < M) y[(size_t)m * N + n] = from_float<T>(epilogue<GELU>(acc[j][i], sc, b));
    }
  }
}

struct GemvPlan {
  int row_blocks, splits, chunks_per_block, nt;
  size_t partial_floats;
};

GemvPlan plan_gemv(int M, int N, int K, int num_sms) {
  GemvPlan p;
  p.nt = M <= 8 ? 1 : (M <= 16 ? 2 : 4);
  p.row_blocks = (N + GEMV_ROWS - 1) / GEMV_ROWS;
  const int nchunks = (K + 127) / 128;
  const int target = 8 * num_sms;  // blocks per launch: keeps the per-SM byte count even
  int splits = (target + p.row_blocks - 1) / p.row_blocks;
  splits = splits < 1 ? 1 : (splits > nchunks ? nchunks : splits);
  p.chunks_per_block = (nchunks + splits - 1) / splits;
  p.splits = (nchunks + p.chunks_per_block - 1) / p.chunks_per_block;
  p.partial_floats = p.splits > 1 ? (size_t)p.splits * p.row_blocks * GEMV_WARPS * p.nt * 128 : 0;
  return p;
}

// ---------------------------------------------------------------------------------
// gemm: M > 32.
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, GEMM_THREADS = 256;
constexpr int A_STAGE_BYTES = BM * BK * 2;  // fp16/bf16
constexpr int B_STAGE_BYTES = BN * BK;      // int8
constexpr int GEMM_SMEM = STAGES * (A_STAGE_BYTES + B_STAGE_BYTES);

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

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

template <typename T, bool GELU>
cudaError_t launch(const void* x, const int8_t* w, const float* scales, const void* bias, void* y, int M, int N,
                   int K, float* partials, int* counters, int num_sms, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  if (M <= 32) {
    const GemvPlan p = plan_gemv(M, N, K, num_sms);
    const dim3 grid(p.row_blocks, p.splits), block(GEMV_WARPS * 32);
    const int cpb = p.chunks_per_block;
    if (p.nt == 1)
      gemv_kernel<T, 1, 2, GELU><<<grid, block, 0, stream>>>(xp, w, scales, bp, yp, M, N, K, cpb, partials, counters);
    else if (p.nt == 2)
      gemv_kernel<T, 2, 2, GELU><<<grid, block, 0, stream>>>(xp, w, scales, bp, yp, M, N, K, cpb, partials, counters);
    else
      gemv_kernel<T, 4, 1, GELU><<<grid, block, 0, stream>>>(xp, w, scales, bp, yp, M, N, K, cpb, partials, counters);
    return cudaGetLastError();
  }
  // The attribute is per device; setting it is cheap and allowed during capture.
  cudaError_t e =
      cudaFuncSetAttribute(gemm_kernel<T, GELU>, cudaFuncAttributeMaxDynamicSharedMemorySize, GEMM_SMEM);
  if (e != cudaSuccess) return e;
  const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
  gemm_kernel<T, GELU><<<grid, GEMM_THREADS, GEMM_SMEM, stream>>>(xp, w, scales, bp, yp, M, N, K);
  return cudaGetLastError();
}

}  // namespace

// dtype_code: 0 = float16, 1 = bfloat16. bias may be null. Shapes: x [M, K], w [N, K],
// scales [N], bias [N], y [M, N], all contiguous; K % 16 == 0.
// partials: fp32 workspace, counters: int32 buffer of at least ceil(N / 64) zeros that
// the kernel leaves zeroed. Call first with partial_floats != nullptr to get the
// workspace size (in floats; 0 means none is needed) without launching anything.
cudaError_t w8a16_linear(const void* x, const int8_t* w, const float* scales, const void* bias, void* y,
                         int M, int N, int K, int dtype_code, bool gelu, float* partials, int* counters,
                         int num_sms, size_t* partial_floats, cudaStream_t stream) {
  if (partial_floats) {
    *partial_floats = (M <= 32 && M > 0 && N > 0 && K > 0) ? plan_gemv(M, N, K, num_sms).partial_floats : 0;
    return cudaSuccess;
  }
  if (M == 0 || N == 0) return cudaSuccess;
  if (dtype_code == 0)
    return gelu ? launch<__half, true>(x, w, scales, bias, y, M, N, K, partials, counters, num_sms, stream)
                : launch<__half, false>(x, w, scales, bias, y, M, N, K, partials, counters, num_sms, stream);
  return gelu ? launch<__nv_bfloat16, true>(x, w, scales, bias, y, M, N, K, partials, counters, num_sms, stream)
              : launch<__nv_bfloat16, false>(x, w, scales, bias, y, M, N, K, partials, counters, num_sms, stream);
}
