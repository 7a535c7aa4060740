// CUDA side of the w8a16 ops. The public schemas (torch.ops.w8a16.*) are defined
// in Python (w8a16_ops/_ops.py) so they exist on machines without a GPU; their
// CUDA implementations there validate the arguments (w8a16_ops/_checks.py, the same
// code the fake kernels run, so eager and compiled calls fail identically) and then
// call the internal ops registered here, torch.ops.w8a16_cuda.*, which only launch.
// The checks below are internal invariants, not user-facing validation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "decode_attention.h"

#include <vector>

cudaError_t w8a16_linear(const void* x, const int8_t* w, const float* scales, const void* bias, void* y,
                         int M, int N, int K, int dtype_code, bool gelu, cudaStream_t stream);


namespace {

int dtype_code(at::ScalarType t) { return t == at::kHalf ? 0 : 1; }

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& bias, bool gelu) {
  TORCH_CHECK(x.is_cuda() && weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "w8a16_cuda.linear: internal op called with unchecked arguments");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % 16 == 0 && N <= INT32_MAX && K <= INT32_MAX, "w8a16_cuda.linear: bad sizes");
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = scales.contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (K == 0) {  // empty reduction: y = act(bias)
    if (bc.defined()) {
      at::Tensor b = bc.to(at::kFloat).expand(out_shape);
      y.copy_(gelu ? at::gelu(b) : b);
    } else {
      y.zero_();
    }
    return y;
  }
  const int64_t M = xc.numel() / K;
  TORCH_CHECK(M <= INT32_MAX, "w8a16_cuda.linear: too many rows");
  if (M == 0 || N == 0) return y;
  const cudaError_t err = w8a16_linear(xc.data_ptr(), weight.data_ptr<int8_t>(), sc.data_ptr<float>(),
                                       bc.defined() ? bc.data_ptr() : nullptr, y.data_ptr(), (int)M, (int)N, (int)K,
                                       dtype_code(x.scalar_type()), gelu, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "w8a16.linear: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

// Shared launcher of decode_attention and cache_attention (step != nullptr). q is [B, H, D]
// with a unit last stride.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int* length,
                  double scale, const c10::optional<at::Tensor>& scores, const W8A16CacheStep* step) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = k_cache.size(2);
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0 || H == 0) return out;
  const size_t ws_bytes = w8a16_decode_attention_workspace_bytes((int)B, (int)H, (int)S, (int)D);
  at::Tensor ws = at::empty({(int64_t)std::max<size_t>(ws_bytes, 1)}, q.options().dtype(at::kByte));
  const cudaError_t err = w8a16_decode_attention(
      q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), length,
      scores.has_value() ? scores->data_ptr<float>() : nullptr, out.data_ptr(), ws.data_ptr(), (int)B, (int)H,
      (int)S, (int)D, (float)scale, dtype_code(q.scalar_type()), step, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "w8a16 decode attention: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& length, double scale, const c10::optional<at::Tensor>& scores) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && k_cache.dim() == 4 && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && length.scalar_type() == at::kInt,
              "w8a16_cuda.decode_attention: internal op called with unchecked arguments");
  const c10::cuda::CUDAGuard guard(q.device());
  // length is often an expanded scalar ((seen + 1).expand(B), stride 0): the kernel
  // reads length[b] densely, so it needs its own B ints.
  const at::Tensor lc = length.contiguous();
  return attend(unit_last_stride(q), k_cache, v_cache, lc.data_ptr<int>(), scale, scores, nullptr);
}

// One decode step of a cache policy (w8a16.cache_attention_full / cache_attention_evict):
// pos and free are given for the evicting policies, both absent for `full`.
at::Tensor cache_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seen,
                           double scale, const c10::optional<at::Tensor>& pos, const c10::optional<at::Tensor>& free,
                           const c10::optional<at::Tensor>& scores, int64_t budget, int64_t n_sink, int64_t recent,
                           const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3 && k_cache.dim() == 4 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && seen.scalar_type() == at::kLong &&
                  pos.has_value() == free.has_value() && (!pos.has_value() || pos->is_contiguous()) &&
                  (!free.has_value() || free->is_contiguous()) && cos.has_value() == sin.has_value() &&
                  (!cos.has_value() || (cos->is_contiguous() && sin->is_contiguous() && cos->dim() == 1 &&
                                        sin->numel() == cos->numel())),
              "w8a16_cuda.cache_attention: internal op called with unchecked arguments");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor kn = unit_last_stride(k_new), vn = unit_last_stride(v_new);
  W8A16CacheStep step;
  step.k_new = kn.data_ptr();
  step.v_new = vn.data_ptr();
  step.kn_sb = kn.stride(0);
  step.kn_sh = kn.stride(1);
  step.vn_sb = vn.stride(0);
  step.vn_sh = vn.stride(1);
  step.seen = seen.data_ptr<int64_t>();
  if (cos.has_value()) {
    step.rot_cos = cos->data_ptr();
    step.rot_sin = sin->data_ptr();
    step.rot_dim = (int)cos->numel();
  }
  if (pos.has_value()) {
    step.pos = pos->data_ptr<int>();
    step.free_slot = free->data_ptr<int64_t>();
    TORCH_CHECK(budget >= 1 && budget <= INT32_MAX && n_sink >= 0 && n_sink <= INT32_MAX && recent >= 0 &&
                    recent <= INT32_MAX,
                "w8a16_cuda.cache_attention: bad policy sizes");
    step.budget = (int)budget;
    step.n_sink = (int)n_sink;
    step.recent = (int)recent;
  }
  return attend(unit_last_stride(q), k_cache, v_cache, nullptr, scale, scores, &step);
}

}  // namespace

TORCH_LIBRARY(w8a16_cuda, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias, bool gelu) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor length, float scale, "
        "Tensor(a!)? scores=None) -> Tensor");
  m.def("cache_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor seen, float scale, Tensor(c!)? pos, Tensor(d!)? free, Tensor(e!)? scores, int budget, "
        "int n_sink, int recent, Tensor? cos, Tensor? sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(w8a16_cuda, CUDA, m) {
  m.impl("linear", &linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("cache_attention", &cache_attention);
}
