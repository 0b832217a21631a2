// CUDA kernels of purecomp::fake_quantize_symmetric / _asymmetric and their backward ops.
//
// The definitions are those of the CPU kernels (fake_quantize.cpp) and of ops/reference.py:
//   symmetric:  s = |scale| + 1e-16, step = s / qh, r = rint(x / step),
//               out = clamp(r, ql, qh) * step + 0,
//               dx = g inside, dscale = sgn(scale) sum(g (out - x) / s inside, g above, g ql/qh below);
//   asymmetric: (low, range) adjusted so that 0 is a level, step = range / n, zp = rint(-low / step),
//               r = rint((x - low) / step), out = (clamp(r, 0, n) - zp) * step + 0,
//               dx = g inside, dlow = sum(g outside), drange = sgn(range) sum(g (out - x) / range inside, g above).
// Every float32 operation of the forward is an IEEE round-to-nearest intrinsic (__fdiv_rn,
// __fmul_rn, __fadd_rn, __fsub_rn: never contracted into an FMA, never a reciprocal), in the
// reference's order, so the float32 forward equals the reference bit for bit.
//
// Layout: x is made contiguous and viewed as (outer, C, inner) (C = 1 per-tensor). Both kernels
// run a grid (C, K): block (c, k) works on channel c only, so each thread derives the channel's
// quantizer from the raw parameters once (no separate parameter kernel). The backward's parameter
// sums are per channel, in double: each block reduces its terms in a fixed-order tree, and a
// one-thread-per-channel kernel adds the K block partials in order and writes the parameter
// gradients. No atomics: the result depends only on the shape and the multiprocessor count.
// Launches: one for the forward, two for the backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace purecomp {
namespace {

constexpr float kEps = 1e-16f;  // reference.EPS as a float32
constexpr int kThreads = 256;

__device__ __forceinline__ float sgnf(float v) { return static_cast<float>((v > 0.f) - (v < 0.f)); }

// clamp that keeps NaN (as torch.clamp and at::vec::clamp do).
__device__ __forceinline__ float clamp_keep_nan(float r, float lo, float hi) {
  return isnan(r) ? r : fminf(fmaxf(r, lo), hi);
}

// ---------------------------------------------------------------- parameters
// Same float32 operations, in the same order, as sym_params / asym_params (fake_quantize.cpp),
// computed by each thread for the one channel its block works on.

struct SymmetricQ {
  float s, step, sign, ql, qh;
  __device__ __forceinline__ float level(float x) const { return rintf(__fdiv_rn(x, step)); }
  __device__ __forceinline__ float value(float q) const { return __fadd_rn(__fmul_rn(q, step), 0.f); }
  __device__ __forceinline__ float lo() const { return ql; }
  __device__ __forceinline__ float hi() const { return qh; }
};

struct AsymmetricQ {
  float low, range, step, zp, sign, n;
  __device__ __forceinline__ float level(float x) const { return rintf(__fdiv_rn(__fsub_rn(x, low), step)); }
  __device__ __forceinline__ float value(float q) const { return __fadd_rn(__fmul_rn(__fsub_rn(q, zp), step), 0.f); }
  __device__ __forceinline__ float lo() const { return 0.f; }
  __device__ __forceinline__ float hi() const { return n; }
};

// The raw parameters (per-tensor: stride 0) and the quantizer of channel c.
struct SymmetricArgs {
  const float* scale;
  int64_t stride;
  float ql, qh;
  __device__ SymmetricQ at(int64_t c) const {
    const float v = scale[c * stride];
    const float s = __fadd_rn(fabsf(v), kEps);
    return {s, __fdiv_rn(s, qh), sgnf(v), ql, qh};
  }
};

struct AsymmetricArgs {
  const float *input_low, *input_range;
  int64_t low_stride, range_stride;
  float n;
  __device__ AsymmetricQ at(int64_t c) const {
    const float raw_low = input_low[c * low_stride];
    const float raw_range = __fadd_rn(fabsf(input_range[c * range_stride]), kEps);
    const float l1 = (0.f < raw_low) ? 0.f : raw_low;  // std::min(raw_low, 0.f)
    const float sum = __fadd_rn(raw_low, raw_range);
    const float h1 = (sum < 0.f) ? 0.f : sum;  // std::max(sum, 0.f)
    const float z = rintf(__fdiv_rn(__fmul_rn(-l1, n), __fsub_rn(h1, l1)));
    const bool interior = z > 0.f && z < n;
    const float safe_z = interior ? z : 1.f;
    const float t = __fdiv_rn(__fsub_rn(safe_z, n), safe_z);
    const float h2 = __fmul_rn(t, l1);
    const float l2 = __fdiv_rn(h1, interior ? t : -1.f);
    const bool take_low_end = __fsub_rn(h2, l1) > __fsub_rn(h1, l2);
    const float adj_low = (interior && !take_low_end) ? l2 : l1;
    const float adj_high = (interior && take_low_end) ? h2 : h1;
    const float range = __fsub_rn(adj_high, adj_low);
    const float step = __fdiv_rn(range, n);
    return {adj_low, range, step, rintf(__fdiv_rn(-adj_low, step)), sgnf(input_range[c * range_stride]), n};
  }
};

// ---------------------------------------------------------------- kernels

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, float v) {
  p[i] = static_cast<T>(v);  // round to nearest even for float16 / bfloat16
}

struct Layout {
  int64_t numel, C, inner;
  // j-th element of channel c (j over the outer x inner positions of the channel)
  __device__ __forceinline__ int64_t element(int64_t c, int64_t j) const {
    return C == 1 ? j : (j / inner) * C * inner + c * inner + j % inner;
  }
};

// grid (C, K): block (c, k) handles elements j = k * blockDim + t, stepping by K * blockDim, of
// channel c, whose parameters each thread computes once.
template <typename T, typename Args>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ out, Layout layout, Args args) {
  const int64_t c = blockIdx.x;
  const auto q = args.at(c);
  const int64_t per_channel = layout.numel / layout.C;
  for (int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < per_channel;
       j += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t i = layout.element(c, j);
    store(out, i, q.value(clamp_keep_nan(q.level(load(x, i)), q.lo(), q.hi())));
  }
}

// Same grid; partial[(c * K + k) * 3 + m] = the block's sum of term m:
//   m = 0: g (out - x) inside (0 * (out - x) outside, NaN for an infinite or NaN x, as in the reference)
//   m = 1: g below (r < lo, or NaN)      m = 2: g above (r > hi)
template <typename T, typename Args>
__global__ void backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx, Layout layout,
                                Args args, double* __restrict__ partial) {
  __shared__ double sums[3][kThreads];
  const int64_t c = blockIdx.x;
  const auto q = args.at(c);
  const int64_t K = gridDim.y;
  const int64_t per_channel = layout.numel / layout.C;
  double a_in = 0.0, a_below = 0.0, a_above = 0.0;
  for (int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < per_channel;
       j += K * blockDim.x) {
    const int64_t i = layout.element(c, j);
    const float xv = load(x, i), gv = load(g, i);
    const float r = q.level(xv);
    const float qv = clamp_keep_nan(r, q.lo(), q.hi());
    const float out = q.value(qv);
    const bool inside = qv == r;  // false for NaN
    const bool above = r > q.hi();
    const float d = inside ? gv : 0.f;
    store(dx, i, d);
    a_in += static_cast<double>(__fmul_rn(d, __fsub_rn(out, xv)));
    if (above) {
      a_above += static_cast<double>(gv);
    } else if (!inside) {
      a_below += static_cast<double>(gv);
    }
  }
  sums[0][threadIdx.x] = a_in;
  sums[1][threadIdx.x] = a_below;
  sums[2][threadIdx.x] = a_above;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      for (int m = 0; m < 3; ++m) sums[m][threadIdx.x] += sums[m][threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x < 3) partial[(c * K + blockIdx.y) * 3 + threadIdx.x] = sums[threadIdx.x][0];
}

// One thread per channel: the K partials summed in order, then the parameter gradients.
//   symmetric:  dscale = sign (s0 / s + s2 + s1 ql/qh)
//   asymmetric: dlow = s2 + s1,  drange = sign (s0 / range + s2)
struct ChannelSums {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
};

__device__ ChannelSums channel_sums(const double* partial, int64_t c, int64_t K) {
  ChannelSums t;
  for (int64_t k = 0; k < K; ++k) {
    const double* p = partial + (c * K + k) * 3;
    t.s0 += p[0];
    t.s1 += p[1];
    t.s2 += p[2];
  }
  return t;
}

__global__ void symmetric_finalize_kernel(const double* partial, int64_t C, int64_t K, SymmetricArgs args,
                                          float* grad_scale) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const ChannelSums t = channel_sums(partial, c, K);
  const SymmetricQ q = args.at(c);
  const double below_factor = static_cast<double>(args.ql) / static_cast<double>(args.qh);
  grad_scale[c] = static_cast<float>(q.sign * (t.s0 / q.s + t.s2 + t.s1 * below_factor));
}

__global__ void asymmetric_finalize_kernel(const double* partial, int64_t C, int64_t K, AsymmetricArgs args,
                                           float* grad_low, float* grad_range) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const ChannelSums t = channel_sums(partial, c, K);
  const AsymmetricQ q = args.at(c);
  grad_low[c] = static_cast<float>(t.s2 + t.s1);
  grad_range[c] = static_cast<float>(q.sign * (t.s0 / q.range + t.s2));
}

// ---------------------------------------------------------------- host side
// Error messages format integers with std::to_string: inserting a long into an ostream from code
// built by nvcc crashed on one toolchain (CUDA 13, torch 2.11).

std::string text(int64_t v) { return std::to_string(v); }

std::string text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t d = 0; d < sizes.size(); ++d) out += (d ? ", " : "") + std::to_string(sizes[d]);
  return out + "]";
}

struct Prepared {
  at::Tensor x;  // contiguous
  Layout layout;
};

Prepared prepare(const at::Tensor& x, std::initializer_list<at::Tensor> params, std::optional<int64_t> axis) {
  TORCH_CHECK(x.is_cuda(), "purecomp fake quantize (CUDA kernel): x must be a CUDA tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "purecomp fake quantize: x must be float32, float16 or bfloat16, got ", t);
  int64_t C = 1, inner = x.numel();
  if (axis.has_value()) {
    TORCH_CHECK(x.dim() > 0 && *axis >= -x.dim() && *axis < x.dim(), "purecomp fake quantize: axis " + text(*axis) +
                " is out of range for an input of " + text(x.dim()) + " dimensions");
    const int64_t a = *axis < 0 ? *axis + x.dim() : *axis;
    C = x.size(a);
    inner = 1;
    for (int64_t d = a + 1; d < x.dim(); ++d) inner *= x.size(d);
  }
  for (const auto& p : params) {
    TORCH_CHECK(p.device() == x.device() && p.scalar_type() == at::kFloat,
                "purecomp fake quantize: parameters must be float32 tensors on x's device (", x.device(), "), got ",
                p.scalar_type(), " on ", p.device());
    TORCH_CHECK(p.numel() == C && (!axis.has_value() || p.dim() == 1),
                "purecomp fake quantize: a parameter must have " + text(C) + " element(s)" +
                    (axis.has_value() ? " and shape (C,)" : "") + ", got shape " + text(p.sizes()));
  }
  return {x.contiguous(), Layout{x.numel(), C, std::max<int64_t>(inner, 1)}};
}

int64_t param_stride(const at::Tensor& p) { return p.dim() == 1 ? p.stride(0) : 0; }

int multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Blocks per channel: about 8 blocks per multiprocessor in all, at least one, and no more than
// the channel has elements for (4 per thread).
dim3 grid_for(const Layout& layout) {
  const int64_t per_channel = layout.numel / layout.C;
  const int64_t target = (int64_t{multiprocessors()} * 8 + layout.C - 1) / layout.C;
  const int64_t most = std::max<int64_t>(1, per_channel / (kThreads * 4));
  return dim3(static_cast<unsigned>(layout.C), static_cast<unsigned>(std::clamp<int64_t>(std::min(target, most), 1, 65535)));
}

unsigned blocks_for(int64_t work) { return static_cast<unsigned>(std::max<int64_t>(1, (work + kThreads - 1) / kThreads)); }

template <typename Args>
at::Tensor run_forward(const Prepared& p, const Args& args) {
  at::Tensor out = at::empty_like(p.x);
  if (p.layout.numel == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "purecomp_fake_quantize_cuda", [&] {
    forward_kernel<scalar_t, Args><<<grid_for(p.layout), kThreads, 0, stream>>>(
        p.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p.layout, args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (grad_x, the block partials [C, K, 3] in double, K)
template <typename Args>
std::tuple<at::Tensor, at::Tensor, int64_t> run_backward(const at::Tensor& grad, const Prepared& p, const Args& args) {
  TORCH_CHECK(grad.sizes() == p.x.sizes() && grad.scalar_type() == p.x.scalar_type() && grad.device() == p.x.device(),
              "purecomp fake quantize backward: grad must match x in shape, dtype and device");
  const at::Tensor g = grad.contiguous();
  at::Tensor dx = at::empty_like(p.x);
  const int64_t C = p.layout.C;
  if (p.layout.numel == 0) return {dx, at::zeros({C, 1, 3}, p.x.options().dtype(at::kDouble)), 1};
  const dim3 grid = grid_for(p.layout);
  at::Tensor partial = at::empty({C, static_cast<int64_t>(grid.y), 3}, p.x.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "purecomp_fake_quantize_backward_cuda",
                                  [&] {
                                    backward_kernel<scalar_t, Args><<<grid, kThreads, 0, stream>>>(
                                        g.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                        dx.mutable_data_ptr<scalar_t>(), p.layout, args,
                                        partial.mutable_data_ptr<double>());
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, partial, static_cast<int64_t>(grid.y)};
}

void check_levels_symmetric(int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK(quant_min < quant_max && quant_max > 0, "purecomp fake quantize: need quant_min < quant_max and quant_max > 0");
}

SymmetricArgs symmetric_args(const at::Tensor& scale, int64_t quant_min, int64_t quant_max) {
  return {scale.const_data_ptr<float>(), param_stride(scale), static_cast<float>(quant_min),
          static_cast<float>(quant_max)};
}

AsymmetricArgs asymmetric_args(const at::Tensor& input_low, const at::Tensor& input_range, int64_t levels) {
  return {input_low.const_data_ptr<float>(), input_range.const_data_ptr<float>(), param_stride(input_low),
          param_stride(input_range), static_cast<float>(levels)};
}

at::Tensor empty_param(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options());  // contiguous: the finalize kernel writes C floats in order
}

at::Tensor symmetric_forward_cuda(const at::Tensor& x, const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                                  std::optional<int64_t> axis) {
  check_levels_symmetric(quant_min, quant_max);
  const Prepared p = prepare(x, {scale}, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  return run_forward(p, symmetric_args(scale, quant_min, quant_max)).view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> symmetric_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                                                           std::optional<int64_t> axis) {
  check_levels_symmetric(quant_min, quant_max);
  const Prepared p = prepare(x, {scale}, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  const SymmetricArgs args = symmetric_args(scale, quant_min, quant_max);
  auto [dx, partial, K] = run_backward(grad, p, args);
  at::Tensor grad_scale = empty_param(scale);
  const int64_t C = p.layout.C;
  symmetric_finalize_kernel<<<blocks_for(C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      partial.const_data_ptr<double>(), C, K, args, grad_scale.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx.view(x.sizes()), grad_scale};
}

at::Tensor asymmetric_forward_cuda(const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
                                   int64_t levels, std::optional<int64_t> axis) {
  TORCH_CHECK(levels > 0, "purecomp fake quantize: levels must be positive");
  const Prepared p = prepare(x, {input_low, input_range}, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  return run_forward(p, asymmetric_args(input_low, input_range, levels)).view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> asymmetric_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                        const at::Tensor& input_low,
                                                                        const at::Tensor& input_range, int64_t levels,
                                                                        std::optional<int64_t> axis) {
  TORCH_CHECK(levels > 0, "purecomp fake quantize: levels must be positive");
  const Prepared p = prepare(x, {input_low, input_range}, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  const AsymmetricArgs args = asymmetric_args(input_low, input_range, levels);
  auto [dx, partial, K] = run_backward(grad, p, args);
  at::Tensor grad_low = empty_param(input_low), grad_range = empty_param(input_range);
  const int64_t C = p.layout.C;
  asymmetric_finalize_kernel<<<blocks_for(C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      partial.const_data_ptr<double>(), C, K, args, grad_low.mutable_data_ptr<float>(),
      grad_range.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx.view(x.sizes()), grad_low, grad_range};
}

}  // namespace

TORCH_LIBRARY_IMPL(purecomp, CUDA, m) {
  m.impl("fake_quantize_symmetric", &symmetric_forward_cuda);
  m.impl("fake_quantize_symmetric_backward", &symmetric_backward_cuda);
  m.impl("fake_quantize_asymmetric", &asymmetric_forward_cuda);
  m.impl("fake_quantize_asymmetric_backward", &asymmetric_backward_cuda);
}

}  // namespace purecomp
