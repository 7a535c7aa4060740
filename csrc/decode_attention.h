// Host API of csrc/decode_attention.cu (pure CUDA, no torch headers), used by csrc/ops.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

// A fused cache step (optional): before attending, the new token (k_new, v_new) is written
// into the cache, and afterwards an evicting policy frees its victim. See
// w8a16_ops/reference.py (cache_attention_full / cache_attention_evict) for the semantics.
struct W8A16CacheStep {
  const void* k_new = nullptr;    // [B, H, D], strides (kn_sb, kn_sh, 1) in elements
  const void* v_new = nullptr;    // [B, H, D], strides (vn_sb, vn_sh, 1)
  long long kn_sb = 0, kn_sh = 0, vn_sb = 0, vn_sh = 0;
  const int64_t* seen = nullptr;  // [1]: the new token's position; the step attends over
                                  // min(seen + 1, S) slots (`length` is not used)
  // Rotary embedding of the new token (optional): q and k_new are rotated on their first rot_dim
  // dims (GPT-NeoX's rotate_half form) before use; cos / sin are [rot_dim] in q's dtype.
  const void* rot_cos = nullptr;
  const void* rot_sin = nullptr;
  int rot_dim = 0;
  // Evicting policies only (nullptr for `full`, whose new token goes to slot `seen`):
  int* pos = nullptr;             // [B, H, S] position held in each slot, -1 = empty
  int64_t* free_slot = nullptr;   // [B, H] the slot the new token goes to
  int budget = 0, n_sink = 0, recent = 0;
  // Programmatic dependent launch (sm_90+; ignored below): the kernel may start while the
  // previous kernel in the stream still runs, and reads the cache (k, v, pos, scores), seen and
  // free_slot before it waits for that kernel (q, k_new, v_new, cos and sin after). The caller
  // promises that the kernel launched just before this one writes none of those (true in a
  // decode step, where that kernel is the QKV projection).
  bool overlap = false;
};

size_t w8a16_decode_attention_workspace_bytes(int B, int H, int S, int D);

// q: [B,H,D] with strides (q_sb, q_sh, 1); k,v: [B,H,S,D] contiguous; length: [B] int32 (device,
// unused with a step); scores: [B,H,S] fp32 or nullptr; out: [B,H,D] contiguous.
// dtype_code: 0 = float16, 1 = bfloat16. step: nullptr for plain attention.
cudaError_t w8a16_decode_attention(const void* q, long long q_sb, long long q_sh, void* k, void* v,
                                   const int* length, float* scores, void* out, void* workspace, int B, int H,
                                   int S, int D, float scale, int dtype_code, const W8A16CacheStep* step,
                                   cudaStream_t stream);
