// Programmatic dependent launch (sm_90+): a kernel launched with the attribute may start while
// the kernel before it in the stream is still running. It must execute pdl_wait() before it
// reads anything that kernel writes and before it writes anything; pdl_wait() returns once the
// previous kernel has completed and its memory is visible (at once for a normal launch, and a
// no-op below sm_90). pdl_trigger() lets the next such kernel launch; every kernel here calls it
// only after its own pdl_wait(), so a kernel that starts early still sees every kernel before
// its immediate predecessor completed.
#pragma once
#include <cuda_runtime.h>

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The launch attribute that lets a kernel start before its predecessor in the stream ends.
inline void pdl_attr(cudaLaunchAttribute& a) {
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
}
