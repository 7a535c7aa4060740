// CUDA implementations of the w8a16 ops. The schemas are defined in Python
// (w8a16_ops/_ops.py) so the ops exist on machines without a GPU; this file only
// registers the CUDA kernels. The checks below follow w8a16_ops/_checks.py in
// order and wording, so eager calls and compiled calls (which run the fake
// kernel at trace time) fail with the same message.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

cudaError_t w8a16_linear(const void* x, const int8_t* w, const float* scales, const void* bias, void* y,
                         int M, int N, int K, int dtype_code, bool gelu, cudaStream_t stream);

size_t w8a16_decode_attention_workspace_bytes(int B, int H, int S, int D);
cudaError_t w8a16_decode_attention(const void* q, const void* k, const void* v, const int* length,
                                   float* scores, void* out, void* workspace, int B, int H, int S, int D,
                                   float scale, int dtype_code, cudaStream_t stream);

namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

std::string desc(const at::Tensor& t) { return dtype_name(t.scalar_type()) + " " + shape_str(t.sizes()); }

void check_devices(const char* op, const std::vector<std::pair<const char*, const at::Tensor*>>& named) {
  bool mixed = false;
  c10::optional<c10::Device> first;
  for (auto& [n, t] : named) {
    if (!t) continue;
    if (!first) first = t->device();
    else if (t->device() != *first) mixed = true;
  }
  if (!mixed) return;
  std::ostringstream o;
  bool sep = false;
  for (auto& [n, t] : named) {
    if (!t) continue;
    o << (sep ? ", " : "") << n << " on " << t->device().str();
    sep = true;
  }
  TORCH_CHECK(false, op, ": all tensors must be on the same device, got ", o.str());
}

void check_capability(const char* op, const at::Tensor& t) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.device().index());
  TORCH_CHECK(major >= 8, op, ": requires compute capability >= 8.0, found ", major, ".", minor);
}

int dtype_code(at::ScalarType t) { return t == at::kHalf ? 0 : 1; }

at::Tensor linear_impl(const char* op, bool gelu, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& scales, const c10::optional<at::Tensor>& bias_opt) {
  const at::Tensor* bias = bias_opt.has_value() ? &bias_opt.value() : nullptr;
  check_devices(op, {{"x", &x}, {"weight", &weight}, {"scales", &scales}, {"bias", bias}});
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., K], got a 0-d tensor");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2, op,
              ": weight must be int8 of shape [N, K], got ", desc(weight));
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous (row-major [N, K]), got strides ",
              shape_str(weight.strides()));
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, op, ": K mismatch: x has K=", x.size(-1), " in its last dim, weight [N, K] has K=",
              K);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == N, op,
              ": scales must be float32 of shape [", N, "], got ", desc(scales));
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == N, op,
                ": bias must be ", dtype_name(x.scalar_type()), " of shape [", N, "], got ", desc(*bias));
  }
  check_capability(op, x);
  TORCH_CHECK(K % 16 == 0, op, ": K must be a multiple of 16 on CUDA, got K=", K);

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = scales.contiguous();
  at::Tensor bc;
  if (bias) bc = bias->contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  const int64_t M = K == 0 ? 0 : xc.numel() / K;
  if (K == 0) {  // empty reduction: y = act(bias)
    if (bias) {
      at::Tensor b = bc.to(at::kFloat).expand(out_shape);
      y.copy_(gelu ? at::gelu(b) : b);
    } else {
      y.zero_();
    }
    return y;
  }
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, op, ": sizes must fit in int32");
  const cudaError_t err =
      w8a16_linear(xc.data_ptr(), weight.data_ptr<int8_t>(), sc.data_ptr<float>(), bias ? bc.data_ptr() : nullptr,
                   y.data_ptr(), (int)M, (int)N, (int)K, dtype_code(x.scalar_type()), gelu,
                   c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& bias) {
  return linear_impl("w8a16.linear", false, x, weight, scales, bias);
}

at::Tensor linear_gelu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  return linear_impl("w8a16.linear_gelu", true, x, weight, scales, bias);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& length, double scale, const c10::optional<at::Tensor>& scores_opt) {
  const char* op = "w8a16.decode_attention";
  const at::Tensor* scores = scores_opt.has_value() ? &scores_opt.value() : nullptr;
  check_devices(op, {{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"length", &length},
                     {"scores", scores}});
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must be float16 or bfloat16, got ", dtype_name(q.scalar_type()));
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape [B, H, D], got ", desc(q));
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k_cache", &k_cache}, {"v_cache", &v_cache}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->dim() == 4 && t->size(0) == B && t->size(1) == H &&
                    t->size(3) == D,
                op, ": ", name, " must be ", dtype_name(q.scalar_type()), " of shape [", B, ", ", H, ", S, ", D,
                "], got ", desc(*t));
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous, got strides ", shape_str(t->strides()));
  }
  const int64_t S = k_cache.size(2);
  TORCH_CHECK(v_cache.size(2) == S, op, ": v_cache must have S=", S, " slots like k_cache, got ", desc(v_cache));
  TORCH_CHECK(length.scalar_type() == at::kInt && length.dim() == 1 && length.size(0) == B, op,
              ": length must be int32 of shape [", B, "], got ", desc(length));
  if (scores) {
    TORCH_CHECK(scores->scalar_type() == at::kFloat && scores->dim() == 3 && scores->size(0) == B &&
                    scores->size(1) == H && scores->size(2) == S,
                op, ": scores must be float32 of shape [", B, ", ", H, ", ", S, "], got ", desc(*scores));
    TORCH_CHECK(scores->is_contiguous(), op, ": scores must be contiguous, got strides ",
                shape_str(scores->strides()));
  }
  check_capability(op, q);
  TORCH_CHECK(D % 8 == 0 && D <= 256, op, ": head_dim D must be a multiple of 8 and at most 256 on CUDA, got D=", D);

  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0 || H == 0) return out;
  const size_t ws_bytes = w8a16_decode_attention_workspace_bytes((int)B, (int)H, (int)S, (int)D);
  at::Tensor ws = at::empty({(int64_t)std::max<size_t>(ws_bytes, 1)}, q.options().dtype(at::kByte));
  const cudaError_t err = w8a16_decode_attention(
      qc.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), length.data_ptr<int>(),
      scores ? scores->data_ptr<float>() : nullptr, out.data_ptr(), ws.data_ptr(), (int)B, (int)H, (int)S, (int)D,
      (float)scale, dtype_code(q.scalar_type()), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(w8a16, CUDA, m) {
  m.impl("linear", &linear);
  m.impl("linear_gelu", &linear_gelu);
  m.impl("decode_attention", &decode_attention);
}
