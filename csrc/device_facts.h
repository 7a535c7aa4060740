// Per-device facts the launchers of csrc/linear.cu, csrc/decode_attention.cu and csrc/norm.cu need, read once
// per device and cached (cudaDeviceGetAttribute is cheap, but launches run on every decode step).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

struct DeviceFacts {
  int dev = 0;            // current device (0 where it cannot be read or is out of range)
  int sms = 1;            // multiprocessors
  bool clusters = false;  // sm_90+: thread-block clusters with distributed shared memory
  int smem_per_sm = 0;    // shared memory per multiprocessor, bytes, rounded down to whole KB
  // Programmatic dependent launch (pdl.h): sm_90+ too, unless the environment has W8A16_PDL=0
  // (read once; every kernel then launches the ordinary way, for debugging and A/B timing).
  bool pdl() const { return clusters && pdl_allowed(); }
  static bool pdl_allowed() {
    static const bool allowed = [] {
      const char* v = std::getenv("W8A16_PDL");
      return v == nullptr || std::strcmp(v, "0") != 0;
    }();
    return allowed;
  }
};

constexpr int kMaxCachedDevices = 64;

inline DeviceFacts device_facts() {
  // One word a device: 0 = not known yet, else (shared KB per SM) << 20 | sms << 1 | clusters
  // (1 <= sms < 2^19), so that a reader sees either nothing or the whole entry; racing first
  // calls store the same value.
  static std::atomic<int> cache[kMaxCachedDevices];
  DeviceFacts f;
  if (cudaGetDevice(&f.dev) != cudaSuccess || f.dev < 0 || f.dev >= kMaxCachedDevices) f.dev = 0;
  int word = cache[f.dev].load(std::memory_order_acquire);
  if (word == 0) {
    int sms = 0, major = 0, smem = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, f.dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, f.dev);
    cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, f.dev);
    const int kb = std::min(std::max(smem, 0) >> 10, 1023);
    word = (kb << 20) | (std::min(std::max(sms, 1), (1 << 19) - 1) << 1) | (major >= 9 ? 1 : 0);
    cache[f.dev].store(word, std::memory_order_release);
  }
  f.sms = (word >> 1) & ((1 << 19) - 1);
  f.clusters = (word & 1) != 0;
  f.smem_per_sm = (word >> 20) << 10;
  return f;
}
