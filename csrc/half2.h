// Two 16-bit floats (float16 or bfloat16) packed in a 32-bit word <-> two floats, shared by the
// kernels that move activations as 16-byte vectors (csrc/decode_attention.cu, csrc/norm.cu).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

template <typename T> struct Half2;
template <> struct Half2<__half> {
  // (low, high) halves of w as floats
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    __half2_raw r;
    r.x = static_cast<unsigned short>(w & 0xffffu);
    r.y = static_cast<unsigned short>(w >> 16);
    return __half22float2(__half2(r));
  }
  // lo, hi rounded to nearest, packed low first
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const uint32_t a = __half_as_ushort(__float2half_rn(lo)), b = __half_as_ushort(__float2half_rn(hi));
    return a | (b << 16);
  }
};
template <> struct Half2<__nv_bfloat16> {
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const uint32_t a = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    const uint32_t b = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return a | (b << 16);
  }
};
