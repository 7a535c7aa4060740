// Programmatic dependent launch (sm_90+): a kernel launched with the attribute may start while
// the kernel before it in the stream is still running. It must execute pdl_wait() before it
// reads anything that kernel writes and before it writes anything; pdl_wait() returns once the
// previous kernel has completed and its memory is visible (at once for a normal launch, and a
// no-op below sm_90). The next such kernel may launch once every block has triggered (or
// exited); the kernels here trigger only through pdl_wait_and_trigger(), after their own wait,
// so a kernel that starts early still sees every kernel before its immediate predecessor
// completed.
#pragma once
#include <cuda_runtime.h>

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait_and_trigger() {
  pdl_wait();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx, optionally with
// programmatic dependent launch (pdl) and thread-block clusters of `cluster` blocks along x.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool pdl, int cluster, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Args&&>(args)...);
}
