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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "decode_attention.h"
#include "linear.h"
#include "norm.h"

#include <cstdint>
#include <cstdlib>
#include <vector>


namespace {

int dtype_code(at::ScalarType t) { return t == at::kHalf ? 0 : 1; }

// The kernels read x and w with 16-byte vector loads: a contiguous tensor whose data starts
// off a 16-byte boundary (a view at an odd storage offset) is copied first.
at::Tensor contiguous16(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// W8A16_GEMM_SPLITS=S (a positive integer) overrides the split-K count of the M > 32 GEMM, for
// tuning and tests; unset or empty: the built-in choice. Read on every M > 32 call (prefill).
int requested_gemm_splits() {
  const char* v = std::getenv("W8A16_GEMM_SPLITS");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long s = std::strtol(v, &end, 10);
  TORCH_CHECK(*end == '\0' && s >= 1 && s <= 1024, "W8A16_GEMM_SPLITS must be an integer in [1, 1024], got '", v,
              "'");
  return (int)s;
}

// 1: int8 weights; 2: 16-bit weights of x's dtype (w8a16.linear's unquantized form).
int weight_bytes(const at::Tensor& x, const at::Tensor& w) {
  if (w.scalar_type() == at::kChar) return 1;
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "w8a16_cuda: internal op called with unchecked weight dtype");
  return 2;
}

// x [M, K] @ w [N, K]^T as fp32 [M, N] through torch's matmul (cuBLAS): aten::mm.dtype, which
// accumulates and writes in fp32, where this torch has it; else the product in x's dtype, widened.
at::Tensor mm_fp32(const at::Tensor& x, const at::Tensor& w) {
  static const c10::optional<c10::OperatorHandle> op = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
  if (op.has_value())
    return op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>().call(x, w.t(), at::kFloat);
  return at::mm(x, w.t()).to(at::kFloat);
}

// 16-bit weights above 32 rows (prefill): torch's matmul into fp32, then our epilogue kernel (scale,
// bias, GeLU, rounding: one pass). The gemv is ours at every M <= 32; the tiled GEMM is int8 only.
at::Tensor linear16_large(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                          const at::Tensor& bias, bool gelu, at::Tensor& y) {
  const int64_t N = w.size(0), M = x.numel() / w.size(1);
  const at::Tensor acc = mm_fp32(x.reshape({M, w.size(1)}), w).contiguous();
  const cudaError_t err = w8a16_epilogue(acc.data_ptr<float>(), scales.data_ptr<float>(),
                                         bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(), (int)M, (int)N,
                                         dtype_code(x.scalar_type()), gelu, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "w8a16.linear: epilogue launch failed: ", cudaGetErrorString(err));
  return y;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& bias, bool gelu) {
  TORCH_CHECK(x.is_cuda() && weight.dim() == 2 && weight.is_contiguous(),
              "w8a16_cuda.linear: internal op called with unchecked arguments");
  const int wbytes = weight_bytes(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % 16 == 0 && N <= INT32_MAX && K <= INT32_MAX, "w8a16_cuda.linear: bad sizes");
  const at::Tensor xc = contiguous16(x);
  const at::Tensor wc = contiguous16(weight);
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
  if (wbytes == 2 && M > 32) return linear16_large(xc, wc, sc, bc, gelu, y);
  // Split-K workspace of the M > 32 GEMM, from the caching allocator (capturable). The gemv
  // (M <= 32, decoding) never splits: no environment lookup on that path.
  const int splits = M > 32 ? w8a16_linear_splits((int)M, (int)N, (int)K, requested_gemm_splits()) : 1;
  at::Tensor ws;
  if (splits > 1) ws = at::empty({(int64_t)splits * M * N}, x.options().dtype(at::kFloat));
  const cudaError_t err = w8a16_linear(xc.data_ptr(), wc.data_ptr(), sc.data_ptr<float>(),
                                       bc.defined() ? bc.data_ptr() : nullptr, y.data_ptr(), (int)M, (int)N, (int)K,
                                       dtype_code(x.scalar_type()), gelu, splits,
                                       ws.defined() ? ws.data_ptr<float>() : nullptr, wbytes,
                                       c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "w8a16.linear: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

// The two linears' operands of linear2 / linear_sum_norm, contiguous (and alive for the launch),
// with their pointers and sizes written into args.
struct Linear2Inputs {
  at::Tensor x[2], w[2], s[2], b[2];
  Linear2Inputs(const at::Tensor& x1, const at::Tensor& w1, const at::Tensor& s1, const c10::optional<at::Tensor>& b1,
                const at::Tensor& x2, const at::Tensor& w2, const at::Tensor& s2, const c10::optional<at::Tensor>& b2,
                W8A16Linear2& args)
      : x{contiguous16(x1), contiguous16(x2)}, w{contiguous16(w1), contiguous16(w2)}, s{s1.contiguous(), s2.contiguous()} {
    if (b1.has_value()) b[0] = b1->contiguous();
    if (b2.has_value()) b[1] = b2->contiguous();
    for (int i = 0; i < 2; ++i) {
      args.x[i] = x[i].data_ptr();
      args.w[i] = static_cast<const int8_t*>(w[i].data_ptr());
      args.scales[i] = s[i].data_ptr<float>();
      args.bias[i] = b[i].defined() ? b[i].data_ptr() : nullptr;
      args.N[i] = (int)w[i].size(0);
      args.K[i] = (int)w[i].size(1);
    }
  }
  // Linear i's weight, scales and bias are the given tensors, not copies.
  bool uncopied(const at::Tensor& wi, const at::Tensor& si, const c10::optional<at::Tensor>& bi, int i) const {
    return w[i].is_same(wi) && s[i].is_same(si) && (!bi.has_value() || b[i].is_same(*bi));
  }
};

// w8a16.linear_pair (sum = false): [y1, y2], and w8a16.linear_sum (sum = true): [y]. Up to 32
// rows both linears run in one gemv launch; above (prefill), as two GEMMs (+ an add for the sum).
std::vector<at::Tensor> linear2(const at::Tensor& x1, const at::Tensor& w1, const at::Tensor& s1,
                                const c10::optional<at::Tensor>& b1, const at::Tensor& x2, const at::Tensor& w2,
                                const at::Tensor& s2, const c10::optional<at::Tensor>& b2, bool gelu1, bool gelu2,
                                bool sum, bool overlap) {
  TORCH_CHECK(x1.is_cuda() && x2.is_cuda() && w1.dim() == 2 && w2.dim() == 2 && w1.is_contiguous() &&
                  w2.is_contiguous() && x1.scalar_type() == x2.scalar_type() &&
                  x1.sizes().slice(0, x1.dim() - 1) == x2.sizes().slice(0, x2.dim() - 1) &&
                  (!sum || w1.size(0) == w2.size(0)) && w1.scalar_type() == w2.scalar_type(),
              "w8a16_cuda.linear2: internal op called with unchecked arguments");
  const c10::cuda::CUDAGuard guard(x1.device());
  const int64_t K1 = w1.size(1), K2 = w2.size(1);
  const int64_t M = K1 > 0 ? x1.numel() / K1 : (K2 > 0 ? x2.numel() / K2 : -1);
  if (M < 0 || M > 32) {  // prefill (or K1 = K2 = 0): the single-linear path, twice
    at::Tensor y1 = linear(x1, w1, s1, b1, gelu1);
    at::Tensor y2 = linear(x2, w2, s2, b2, gelu2);
    if (sum) return {y1.add_(y2)};
    return {y1, y2};
  }
  TORCH_CHECK(K1 % 16 == 0 && K2 % 16 == 0 && K1 <= INT32_MAX && K2 <= INT32_MAX && w1.size(0) <= INT32_MAX &&
                  w2.size(0) <= INT32_MAX,
              "w8a16_cuda.linear2: bad sizes");
  W8A16Linear2 args;
  args.wbytes = weight_bytes(x1, w1);
  const Linear2Inputs in(x1, w1, s1, b1, x2, w2, s2, b2, args);
  std::vector<at::Tensor> out;
  for (int i = 0; i < 2; ++i) {
    if (i == 0 || !sum) {
      const at::Tensor& x = i ? x2 : x1;
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape.back() = args.N[i];
      out.push_back(at::empty(shape, x.options()));
      args.y[i] = out.back().data_ptr();
    }
  }
  args.gelu[0] = gelu1;
  args.gelu[1] = gelu2;
  args.sum = sum;
  // Read before the previous kernel ends (see linear.h): only the caller's own tensors, never a
  // copy made here, whose copy kernel would be that previous kernel.
  args.overlap = overlap && in.uncopied(w1, s1, b1, 0) && in.uncopied(w2, s2, b2, 1) && (!sum || in.x[1].is_same(x2));
  if (M == 0) return out;
  const cudaError_t err = w8a16_linear2(args, (int)M, dtype_code(x1.scalar_type()),
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, sum ? "w8a16.linear_sum" : "w8a16.linear_pair", ": kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

// w8a16.linear_sum_norm, up to 32 rows (the public op composes the rest in Python):
// [y = residual + x1 W1^T s1 + b1 + x2 W2^T s2 + b2, layer_norm_1(y), layer_norm_2(y)], one launch.
std::vector<at::Tensor> linear_sum_norm(const at::Tensor& x1, const at::Tensor& w1, const at::Tensor& s1,
                                        const c10::optional<at::Tensor>& b1, const at::Tensor& x2,
                                        const at::Tensor& w2, const at::Tensor& s2,
                                        const c10::optional<at::Tensor>& b2, const at::Tensor& residual,
                                        const at::Tensor& nw1, const at::Tensor& nb1, const at::Tensor& nw2,
                                        const at::Tensor& nb2, double eps, at::Tensor& workspace) {
  const int64_t N = w1.size(0), K1 = w1.size(1), K2 = w2.size(1);
  TORCH_CHECK(x1.is_cuda() && w1.dim() == 2 && w2.dim() == 2 && w1.is_contiguous() && w2.is_contiguous() &&
                  w2.size(0) == N && K1 % 16 == 0 && K2 % 16 == 0 && K1 + K2 > 0 && residual.size(-1) == N &&
                  workspace.scalar_type() == at::kInt && workspace.is_contiguous() &&
                  workspace.numel() >= 4 + 64 * ((N + 15) / 16) && N <= INT32_MAX && K1 <= INT32_MAX &&
                  K2 <= INT32_MAX && w1.scalar_type() == at::kChar && w2.scalar_type() == at::kChar,
              "w8a16_cuda.linear_sum_norm: internal op called with unchecked arguments");
  const c10::cuda::CUDAGuard guard(x1.device());
  const int64_t M = K1 > 0 ? x1.numel() / K1 : x2.numel() / K2;
  TORCH_CHECK(M >= 0 && M <= 32, "w8a16_cuda.linear_sum_norm: at most 32 rows");
  W8A16Linear2 args;
  const Linear2Inputs in(x1, w1, s1, b1, x2, w2, s2, b2, args);
  const at::Tensor rc = residual.contiguous();
  const at::Tensor nw[2] = {nw1.contiguous(), nw2.contiguous()};
  const at::Tensor nb[2] = {nb1.contiguous(), nb2.contiguous()};
  std::vector<int64_t> shape(x1.sizes().begin(), x1.sizes().end());
  shape.back() = N;
  std::vector<at::Tensor> out = {at::empty(shape, x1.options()), at::empty(shape, x1.options()),
                                 at::empty(shape, x1.options())};
  if (M == 0 || N == 0) return out;
  for (int i = 0; i < 2; ++i) {
    args.norm_w[i] = nw[i].data_ptr();
    args.norm_b[i] = nb[i].data_ptr();
    args.norm_y[i] = out[i + 1].data_ptr();
  }
  args.y[0] = out[0].data_ptr();
  args.sum = true;
  args.residual = rc.data_ptr();
  args.eps = (float)eps;
  args.workspace = workspace.data_ptr<int>();
  const cudaError_t err = w8a16_linear2(args, (int)M, dtype_code(x1.scalar_type()),
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "w8a16.linear_sum_norm: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// w8a16.add_norm_pair: [y = a + b, layer_norm_1(y), layer_norm_2(y)] over the last dim, one
// launch. The public op sends shapes the kernel does not take (norm.h) to the reference.
std::vector<at::Tensor> add_norm_pair(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w1,
                                      const at::Tensor& c1, const at::Tensor& w2, const at::Tensor& c2, double eps,
                                      bool overlap) {
  const int64_t N = a.size(-1);
  TORCH_CHECK(a.is_cuda() && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                  w8a16_add_norm_pair_supported(N) && w1.numel() == N && c1.numel() == N && w2.numel() == N &&
                  c2.numel() == N,
              "w8a16_cuda.add_norm_pair: internal op called with unchecked arguments");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = contiguous16(a), bc = contiguous16(b);
  const at::Tensor par[4] = {contiguous16(w1), contiguous16(c1), contiguous16(w2), contiguous16(c2)};
  // overlap reads the parameters early: only safe on the caller's tensors, never on copies made
  // just now (by a kernel launched right before this one).
  const bool own = par[0].is_same(w1) && par[1].is_same(c1) && par[2].is_same(w2) && par[3].is_same(c2);
  std::vector<at::Tensor> out = {at::empty(a.sizes(), a.options()), at::empty(a.sizes(), a.options()),
                                 at::empty(a.sizes(), a.options())};
  const int64_t M = a.numel() / N;
  TORCH_CHECK(M <= INT32_MAX, "w8a16_cuda.add_norm_pair: too many rows");
  if (M == 0) return out;
  const cudaError_t err = w8a16_add_norm_pair(
      ac.data_ptr(), bc.data_ptr(), par[0].data_ptr(), par[1].data_ptr(), par[2].data_ptr(), par[3].data_ptr(),
      out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(), (int)M, (int)N, (float)eps,
      dtype_code(a.scalar_type()), overlap && own, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "w8a16.add_norm_pair: kernel launch failed: ", cudaGetErrorString(err));
  return out;
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
                           const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                           bool overlap) {
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
  step.overlap = overlap;  // what it reads early (cache, pos, scores, seen, free) is never copied
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

// Whether the add_norm_pair kernel takes rows of N channels; w8a16.add_norm_pair (Python) sends
// the others to its reference, so the limit is written once, here (csrc/norm.cu).
bool add_norm_pair_supported(int64_t N) { return w8a16_add_norm_pair_supported(N); }

}  // namespace

TORCH_LIBRARY(w8a16_cuda, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias, bool gelu) -> Tensor");
  m.def("linear2(Tensor x1, Tensor weight1, Tensor scales1, Tensor? bias1, Tensor x2, Tensor weight2, "
        "Tensor scales2, Tensor? bias2, bool gelu1, bool gelu2, bool sum, bool overlap) -> Tensor[]");
  m.def("linear_sum_norm(Tensor x1, Tensor weight1, Tensor scales1, Tensor? bias1, Tensor x2, Tensor weight2, "
        "Tensor scales2, Tensor? bias2, Tensor residual, Tensor norm_weight1, Tensor norm_bias1, "
        "Tensor norm_weight2, Tensor norm_bias2, float eps, Tensor(a!) workspace) -> Tensor[]");
  m.def("add_norm_pair(Tensor a, Tensor b, Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2, "
        "float eps, bool overlap) -> Tensor[]");
  m.def("add_norm_pair_supported(int N) -> bool", &add_norm_pair_supported);  // no tensors: one kernel for all
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor length, float scale, "
        "Tensor(a!)? scores=None) -> Tensor");
  m.def("cache_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor seen, float scale, Tensor(c!)? pos, Tensor(d!)? free, Tensor(e!)? scores, int budget, "
        "int n_sink, int recent, Tensor? cos, Tensor? sin, bool overlap) -> Tensor");
}

TORCH_LIBRARY_IMPL(w8a16_cuda, CUDA, m) {
  m.impl("linear", &linear);
  m.impl("linear2", &linear2);
  m.impl("linear_sum_norm", &linear_sum_norm);
  m.impl("add_norm_pair", &add_norm_pair);
  m.impl("decode_attention", &decode_attention);
  m.impl("cache_attention", &cache_attention);
}
