// Host API of csrc/linear.cu (pure CUDA, no torch headers), used by csrc/ops.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

// dtype_code: 0 = float16, 1 = bfloat16. Shapes: x [M, K], w [N, K], scales [N] fp32, bias [N]
// (may be null), y [M, N]; all contiguous and 16-byte aligned; K % 16 == 0.
// y = act((x @ w^T) * scales + bias), fp32 accumulation.
// wbytes: 1 when w is int8, 2 when w is 16-bit of x's type (unquantized weights; M <= 32 only,
// the gemv: the caller runs larger M another way).
// M > 32 runs a tiled GEMM that may split K over `splits` blocks per output tile, each writing
// fp32 partial sums to `workspace` (float [splits, M, N]), summed in split order by a second
// kernel that applies the epilogue (deterministic). w8a16_linear_splits gives the split count
// for a shape on the current device, as launched (1: no workspace needed); requested > 0
// overrides the built-in choice (tuning; at most one split per 32 k). M <= 32 ignores both.
int w8a16_linear_splits(int M, int N, int K, int requested);
cudaError_t w8a16_linear(const void* x, const void* w, const float* scales, const void* bias, void* y,
                         int M, int N, int K, int dtype_code, bool gelu, int splits, float* workspace,
                         int wbytes, cudaStream_t stream);

// y[M, N] = act(acc * scales + bias) from fp32 acc [M, N] (contiguous), one pass: the epilogue of
// 16-bit weights above 32 rows, whose product comes from torch's matmul.
cudaError_t w8a16_epilogue(const float* acc, const float* scales, const void* bias, void* y, int M, int N,
                           int dtype_code, bool gelu, cudaStream_t stream);

// Two linears in one gemv launch (M <= 32 rows, the same M for both; same layout rules):
//  * sum == false (w8a16.linear_pair): y[i] = act_i((x[i] @ w[i]^T) * scales[i] + bias[i]), i = 0, 1;
//  * sum == true (w8a16.linear_sum): y[0] = (x[0] @ w[0]^T) * scales[0] + bias[0]
//                                          + (x[1] @ w[1]^T) * scales[1] + bias[1], N[0] == N[1],
//    summed in fp32 and rounded once; gelu and y[1] are ignored.
struct W8A16Linear2 {
  const void* x[2] = {nullptr, nullptr};
  const int8_t* w[2] = {nullptr, nullptr};  // int8, or (wbytes == 2) 16-bit of x's type, both alike
  const float* scales[2] = {nullptr, nullptr};
  const void* bias[2] = {nullptr, nullptr};
  void* y[2] = {nullptr, nullptr};
  int N[2] = {0, 0};
  int K[2] = {0, 0};
  bool gelu[2] = {false, false};
  bool sum = false;
  // sum == true only, optional (norm_y[0] == nullptr: off): w8a16.linear_sum_norm. y[0] becomes
  // residual + the sum (rounded once), and norm_y[i] = layer_norm(y[0], norm_w[i], norm_b[i], eps)
  // (fp32 from the rounded y[0]; i = 0, 1). workspace: int32, >= 4 + 64 * ceil(N / 16), whose
  // first 4 ints are zero before and after the call (one call at a time per workspace).
  const void* residual = nullptr;
  const void* norm_w[2] = {nullptr, nullptr};
  const void* norm_b[2] = {nullptr, nullptr};
  void* norm_y[2] = {nullptr, nullptr};
  float eps = 1e-5f;
  int* workspace = nullptr;
  // Programmatic dependent launch (sm_90+; ignored below): the kernel may start while the
  // previous kernel in the stream still runs, and reads w, scales and, with sum == true, x[1]
  // before it waits for that kernel. The caller promises that none of them is written by the
  // kernel launched just before this one (true of model weights, and of linear_sum's MLP input
  // in a decoder layer, where the attention runs in between).
  bool overlap = false;
  // Bytes of a weight element: 1 (int8) or 2 (16-bit weights, not with linear_sum_norm).
  int wbytes = 1;
};
cudaError_t w8a16_linear2(const W8A16Linear2& args, int M, int dtype_code, cudaStream_t stream);
