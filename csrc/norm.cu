// Residual add + two layer norms of a row (w8a16.add_norm_pair), for the decode step:
//
//   y = a + b, n1 = layer_norm(y; w1, c1), n2 = layer_norm(y; w2, c2)      (see norm.h)
//
// Why a kernel of our own: in the decode step this work sits between linear_sum (the end of
// layer i) and linear_pair (the start of layer i + 1). Inductor's fused norm kernel is launched
// the ordinary way, so linear_pair, launched with programmatic dependent launch, cannot start
// before it ends. This kernel is launched the same way as the ops around it (overlap=True): it
// starts during linear_sum's tail with the norm weights already loaded, lets linear_pair launch
// as soon as its own wait returns, and linear_pair's first weight loads then overlap it.
//
// Design: one block per row, one thread per 8 channels (N % 8 == 0, N <= 8 * 1024), so the row
// stays in registers: the rounded y is summed for the mean, then (y - mean)^2 for the variance
// (two passes over registers, not E[y^2] - mean^2), each block-wide sum in a fixed order.
#include "norm.h"
#include "device_facts.h"
#include "half2.h"
#include "pdl.h"

#include <cstdint>

namespace {

constexpr int kMaxThreads = 1024;

template <typename T>
__device__ __forceinline__ void unpack(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = Half2<T>::unpack(w[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[8]) {
  return make_uint4(Half2<T>::pack(f[0], f[1]), Half2<T>::pack(f[2], f[3]), Half2<T>::pack(f[4], f[5]),
                    Half2<T>::pack(f[6], f[7]));
}

// Sum over the block, the same bits in every thread: an XOR butterfly in each warp, then every
// thread adds the warps' partials in warp order. `red` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warps = (int)(blockDim.x >> 5);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < warps; ++w) s += red[w];
  return s;
}

struct NormParams {
  const uint4* a;
  const uint4* b;
  const uint4* w[2];
  const uint4* c[2];
  uint4* y;
  uint4* n[2];
  int vecs;  // N / 8
  float cols;  // N
  float eps;
};

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) add_norm_pair_kernel(const NormParams p) {
  __shared__ float red[2][kMaxThreads / 32];
  const int i = threadIdx.x;
  const bool in = i < p.vecs;
  // The norm parameters first: under overlap they are read while the previous kernel finishes.
  uint4 w[2], c[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    w[k] = in ? __ldg(p.w[k] + i) : make_uint4(0, 0, 0, 0);
    c[k] = in ? __ldg(p.c[k] + i) : make_uint4(0, 0, 0, 0);
  }
  pdl_wait_and_trigger();
  const size_t at = (size_t)blockIdx.x * p.vecs + i;
  float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (in) {
    float fa[8], fb[8];
    unpack<T>(p.a[at], fa);
    unpack<T>(p.b[at], fb);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = fa[k] + fb[k];
    const uint4 yv = pack<T>(v);  // y as the dtype holds it; the norms start from these values
    unpack<T>(yv, v);
    p.y[at] = yv;
  }
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) s += v[k];
  const float mean = block_sum(s, red[0]) / p.cols;
  float d[8], q = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    d[k] = in ? v[k] - mean : 0.f;
    q = fmaf(d[k], d[k], q);
  }
  const float rstd = rsqrtf(block_sum(q, red[1]) / p.cols + p.eps);
  if (!in) return;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    float g[8], bb[8], o[8];
    unpack<T>(w[k], g);
    unpack<T>(c[k], bb);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = fmaf(d[e] * rstd, g[e], bb[e]);
    p.n[k][at] = pack<T>(o);
  }
}

}  // namespace

bool w8a16_add_norm_pair_supported(long long N) { return N >= 8 && N % 8 == 0 && N <= 8LL * kMaxThreads; }

cudaError_t w8a16_add_norm_pair(const void* a, const void* b, const void* w1, const void* c1, const void* w2,
                                const void* c2, void* y, void* n1, void* n2, int M, int N, float eps, int dtype_code,
                                bool overlap, cudaStream_t stream) {
  if (M < 0 || !w8a16_add_norm_pair_supported(N) || (dtype_code != 0 && dtype_code != 1) || !(eps > 0.f))
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  NormParams p;
  p.a = static_cast<const uint4*>(a);
  p.b = static_cast<const uint4*>(b);
  p.w[0] = static_cast<const uint4*>(w1);
  p.w[1] = static_cast<const uint4*>(w2);
  p.c[0] = static_cast<const uint4*>(c1);
  p.c[1] = static_cast<const uint4*>(c2);
  p.y = static_cast<uint4*>(y);
  p.n[0] = static_cast<uint4*>(n1);
  p.n[1] = static_cast<uint4*>(n2);
  p.vecs = N / 8;
  p.cols = (float)N;
  p.eps = eps;
  const int threads = (p.vecs + 31) / 32 * 32;
  const bool pdl = overlap && device_facts().pdl();
  if (dtype_code == 0)
    return launch_kernel(add_norm_pair_kernel<__half>, dim3((unsigned)M), dim3(threads), 0, stream, pdl, 1, p);
  return launch_kernel(add_norm_pair_kernel<__nv_bfloat16>, dim3((unsigned)M), dim3(threads), 0, stream, pdl, 1, p);
}
