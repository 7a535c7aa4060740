// Host API of csrc/norm.cu (pure CUDA, no torch headers), used by csrc/ops.cpp.
#pragma once
#include <cuda_runtime.h>

// w8a16.add_norm_pair: the residual add at the end of a GPT-NeoX parallel-residual layer and the
// next layer's two layer norms, one block per row:
//   y  = a + b                                  (in fp32, rounded once to the dtype)
//   n1 = layer_norm(y) * w1 + c1, n2 = layer_norm(y) * w2 + c2
//                                               (fp32 from the rounded y, biased variance, eps)
// a, b, y, n1, n2: [M, N] contiguous; w1, c1, w2, c2: [N]; every pointer 16-byte aligned;
// dtype_code 0 = float16, 1 = bfloat16. Supported N: w8a16_add_norm_pair_supported(N). The row
// statistics are fp32, like torch's layer norm: bf16 rows beyond |y| ~ 1e18 overflow the variance.
// overlap (sm_90+, ignored below): launched with programmatic dependent launch, the kernel reads
// w1, c1, w2, c2 before the kernel launched just before it has finished (the caller promises that
// kernel writes none of them), and a, b only after it.
bool w8a16_add_norm_pair_supported(long long N);
cudaError_t w8a16_add_norm_pair(const void* a, const void* b, const void* w1, const void* c1, const void* w2,
                                const void* c2, void* y, void* n1, void* n2, int M, int N, float eps, int dtype_code,
                                bool overlap, cudaStream_t stream);
