// Fake quantization CPU kernels: symmetric and asymmetric, per-tensor and per-channel.
//
// The canonical definitions are the pure-torch composites of ops/reference.py; these
// kernels reproduce them bit for bit in the forward (float32: same divisions, same
// round-half-to-even, same order of float operations) and to float tolerance in the
// backward. Compile with -ffp-contract=off so that no a*b+c is fused into an FMA.
//
// Symmetric (levels ql..qh): s = |scale| + 1e-16, step = s / qh, r = nearbyint(x / step),
//   inside: ql <= r <= qh, above: r > qh, below: otherwise (r < ql, or NaN);
//   out = clamp(r, ql, qh) * step (+0, which turns -0 into +0 as the reference's
//   out + (surrogate - surrogate) does).
//   dx = g inside, 0 outside; dscale = sgn(scale) * sum(g*(out-x)/s inside, g above, g*ql/qh below).
// Asymmetric (levels 0..n): low and range adjusted so that zero is a level (as in
//   reference.adjust_asymmetric_range), step = range / n, zp = nearbyint(-low / step),
//   r = nearbyint((x - low) / step), out = (clamp(r, 0, n) - zp) * step (+0).
//   dx = g inside; dlow = sum(g outside); drange = sgn(range) * sum(g*(out-x)/range inside, g above).
//
// Forward: one pass over x writing out. Backward: one pass over (grad, x) writing grad_x and
// summing the parameter gradients in per-chunk partials (no atomics), the regions being
// recomputed from x exactly as in the forward (so no region mask is stored).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "fake_quantize.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace purecomp {
namespace {

using namespace cpu;

constexpr float kEps = 1e-16f;  // reference.EPS as a float32

// ---------------------------------------------------------------- quantizers
// A table holds the per-position parameters: one entry per channel (splat mode) or one per
// position of a (channels x inner) row (lane mode), padded for full vector loads.

// An Op maps x to its integer level r = round(u(x)), clamps it to [lo, hi] and maps the
// clamped level q back to a float value. at::vec::clamp keeps NaN, as torch.clamp does;
// "+ 0" turns -0 into +0, as the reference's out + (surrogate - surrogate) does.

struct SymTable {
  std::vector<float> step;
  float ql, qh;
};

struct SymOp {
  using Table = SymTable;
  Vec step, ql, qh;
  static SymOp splat(const Table& t, int64_t p) { return {Vec(t.step[p]), Vec(t.ql), Vec(t.qh)}; }
  static SymOp lanes(const Table& t, int64_t p) { return {Vec::loadu(t.step.data() + p), Vec(t.ql), Vec(t.qh)}; }
  Vec level(const Vec& x) const { return (x / step).round(); }
  Vec value(const Vec& q) const { return q * step + Vec(0.f); }
  const Vec& lo() const { return ql; }
  const Vec& hi() const { return qh; }
};

struct AsymTable {
  std::vector<float> low, step, zp;
  float n;
};

struct AsymOp {
  using Table = AsymTable;
  Vec low, step, zp, n;
  static AsymOp splat(const Table& t, int64_t p) {
    return {Vec(t.low[p]), Vec(t.step[p]), Vec(t.zp[p]), Vec(t.n)};
  }
  static AsymOp lanes(const Table& t, int64_t p) {
    return {Vec::loadu(t.low.data() + p), Vec::loadu(t.step.data() + p), Vec::loadu(t.zp.data() + p), Vec(t.n)};
  }
  Vec level(const Vec& x) const { return ((x - low) / step).round(); }
  Vec value(const Vec& q) const { return (q - zp) * step + Vec(0.f); }
  Vec lo() const { return Vec(0.f); }
  const Vec& hi() const { return n; }
};

template <typename Op>
inline Vec forward_value(const Op& op, const Vec& x) {
  return op.value(at::vec::clamp(op.level(x), op.lo(), op.hi()));
}

// Per-element contributions of the backward: grad_x and the three sums the parameter
// gradients are made of: g*(out-x) inside, g below, g above.
template <typename Op>
inline void backward_body(const Op& op, const Vec& x, const Vec& g, Vec& dx, Vec& c_in, Vec& c_below,
                          Vec& c_above) {
  const Vec r = op.level(x);
  const Vec q = at::vec::clamp(r, op.lo(), op.hi());
  const Vec out = op.value(q);
  const Vec inside = q == r;  // false for NaN, like (r >= lo) & (r <= hi)
  const Vec above = r > op.hi();
  const Vec below = (inside | above) ^ (Vec(0.f) == Vec(0.f));  // the rest, NaN included
  dx = g & inside;
  // (g inside, 0 outside) * (out - x): outside terms are 0, or NaN for an infinite or NaN x,
  // as in the reference, whose where() passes 0 * slope to the parameter there.
  c_in = dx * (out - x);
  c_below = g & below;
  c_above = g & above;
}

#if defined(CPU_CAPABILITY_AVX512)
// backward_body's accumulation with AVX-512 mask registers (fewer instructions than vector
// masks): the same values, up to the sign of zero sums.
template <typename Op>
inline void backward_step(const Op& op, const Vec& x, const Vec& g, Vec& dx, Vec& a_in, Vec& a_below,
                          Vec& a_above) {
  const __m512 r = op.level(x);
  const __m512 hi = op.hi();
  const __m512 q = at::vec::clamp(Vec(r), op.lo(), op.hi());
  const __m512 out = op.value(Vec(q));
  const __mmask16 inside = _mm512_cmp_ps_mask(q, r, _CMP_EQ_OQ);  // false for NaN
  const __mmask16 above = _mm512_cmp_ps_mask(r, hi, _CMP_GT_OQ);
  const __mmask16 below = _mm512_knot(_mm512_kor(inside, above));  // the rest, NaN included
  const __m512 d = _mm512_maskz_mov_ps(inside, g);
  dx = d;
  a_in = _mm512_add_ps(a_in, _mm512_mul_ps(d, _mm512_sub_ps(out, x)));
  a_below = _mm512_mask_add_ps(a_below, below, a_below, g);
  a_above = _mm512_mask_add_ps(a_above, above, a_above, g);
}
#else
template <typename Op>
inline void backward_step(const Op& op, const Vec& x, const Vec& g, Vec& dx, Vec& a_in, Vec& a_below,
                          Vec& a_above) {
  Vec c_in, c_below, c_above;
  backward_body(op, x, g, dx, c_in, c_below, c_above);
  a_in += c_in;
  a_below += c_below;
  a_above += c_above;
}
#endif

// The quantizers as the Op of the generic drivers (cpu_kernels.h): the sums are
// s0 = g*(out-x) inside, s1 = g below, s2 = g above.
template <typename Q>
struct Quantizer {
  using Table = typename Q::Table;
  Q q;
  static Quantizer splat(const Table& t, int64_t p) { return {Q::splat(t, p)}; }
  static Quantizer lanes(const Table& t, int64_t p) { return {Q::lanes(t, p)}; }
  Vec forward(const Vec& x) const { return forward_value(q, x); }
  void terms(const Vec& x, const Vec& g, Vec& dx, Vec& t0, Vec& t1, Vec& t2) const {
    backward_body(q, x, g, dx, t0, t1, t2);
  }
  void accumulate(const Vec& x, const Vec& g, Vec& dx, Vec& a0, Vec& a1, Vec& a2) const {
    backward_step(q, x, g, dx, a0, a1, a2);
  }
};
using SymQuantizer = Quantizer<SymOp>;
using AsymQuantizer = Quantizer<AsymOp>;

std::optional<int64_t> check_inputs(const at::Tensor& x, std::initializer_list<at::Tensor> params,
                                    std::optional<int64_t> axis) {
  TORCH_CHECK(x.device().is_cpu(), "purecomp fake quantize (CPU kernel): x must be on the CPU");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "purecomp fake quantize: x must be float32, float16 or bfloat16, got ", t);
  std::optional<int64_t> a;
  int64_t expected = 1;
  if (axis.has_value()) {
    TORCH_CHECK(x.dim() > 0 && *axis >= -x.dim() && *axis < x.dim(), "purecomp fake quantize: axis ", *axis,
                " is out of range for an input of ", x.dim(), " dimensions");
    a = *axis < 0 ? *axis + x.dim() : *axis;
    expected = x.size(*a);
  }
  for (const auto& p : params) {
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat,
                "purecomp fake quantize: parameters must be float32 CPU tensors, got ", p.scalar_type());
    TORCH_CHECK(p.numel() == expected && (!a.has_value() || p.dim() == 1),
                "purecomp fake quantize: a parameter must have ", expected, " element(s)",
                a.has_value() ? " and shape (C,)" : "", ", got shape ", p.sizes());
  }
  return a;
}

void check_grad(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "purecomp fake quantize backward: grad must match x in shape, dtype and device");
}

}  // namespace

// ---------------------------------------------------------------- ops
// The registered CPU kernels are these functions with reuse_grad = false; the autograd kernels
// call them directly for plain CPU tensors (fake_quantize.h).

at::Tensor symmetric_forward_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                                 std::optional<int64_t> axis) {
  TORCH_CHECK(quant_min < quant_max && quant_max > 0, "purecomp fake quantize: need quant_min < quant_max and quant_max > 0");
  const auto a = check_inputs(x, {scale}, axis);
  const Dense d = make_dense(x, a);
  at::Tensor out = empty_like_dense(d);
  const SymParams prm = sym_params(scale, quant_max);
  const SymTable table{layout_table(prm.step, d.geo, 1.f), static_cast<float>(quant_min), static_cast<float>(quant_max)};
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run_forward<T, SymQuantizer>(d.x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), d.geo, table);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> symmetric_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& scale, int64_t quant_min,
                                                          int64_t quant_max, std::optional<int64_t> axis,
                                                          bool reuse_grad) {
  TORCH_CHECK(quant_min < quant_max && quant_max > 0, "purecomp fake quantize: need quant_min < quant_max and quant_max > 0");
  const auto a = check_inputs(x, {scale}, axis);
  check_grad(grad, x);
  const Dense d = make_dense(x, a);
  const at::Tensor g = grad_like_dense(grad, d);
  at::Tensor grad_x = grad_x_buffer(grad, g, d, reuse_grad);
  const SymParams prm = sym_params(scale, quant_max);
  const SymTable table{layout_table(prm.step, d.geo, 1.f), static_cast<float>(quant_min), static_cast<float>(quant_max)};
  std::vector<Sums> sums;
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    sums = run_backward<T, SymQuantizer>(g.const_data_ptr<T>(), d.x.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(),
                                  d.geo, table);
  });
  at::Tensor grad_scale = at::Tensor(at::detail::empty_strided_cpu(scale.sizes(), c10::contiguous_strides(scale.sizes()), at::kFloat));
  float* gs = grad_scale.mutable_data_ptr<float>();
  const double below_factor = static_cast<double>(quant_min) / static_cast<double>(quant_max);
  for (int64_t c = 0; c < static_cast<int64_t>(sums.size()); ++c) {
    const Sums& s = sums[c];
    gs[c] = static_cast<float>(prm.sign[c] * (s.s0 / prm.s[c] + s.s2 + s.s1 * below_factor));
  }
  return {grad_x, grad_scale};
}

at::Tensor asymmetric_forward_cpu(const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
                                  int64_t levels, std::optional<int64_t> axis) {
  TORCH_CHECK(levels > 0, "purecomp fake quantize: levels must be positive");
  const auto a = check_inputs(x, {input_low, input_range}, axis);
  const Dense d = make_dense(x, a);
  at::Tensor out = empty_like_dense(d);
  const AsymParams prm = asym_params(input_low, input_range, levels);
  const AsymTable table{layout_table(prm.low, d.geo, 0.f), layout_table(prm.step, d.geo, 1.f),
                        layout_table(prm.zp, d.geo, 0.f), static_cast<float>(levels)};
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run_forward<T, AsymQuantizer>(d.x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), d.geo, table);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> asymmetric_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
    int64_t levels, std::optional<int64_t> axis, bool reuse_grad) {
  TORCH_CHECK(levels > 0, "purecomp fake quantize: levels must be positive");
  const auto a = check_inputs(x, {input_low, input_range}, axis);
  check_grad(grad, x);
  const Dense d = make_dense(x, a);
  const at::Tensor g = grad_like_dense(grad, d);
  at::Tensor grad_x = grad_x_buffer(grad, g, d, reuse_grad);
  const AsymParams prm = asym_params(input_low, input_range, levels);
  const AsymTable table{layout_table(prm.low, d.geo, 0.f), layout_table(prm.step, d.geo, 1.f),
                        layout_table(prm.zp, d.geo, 0.f), static_cast<float>(levels)};
  std::vector<Sums> sums;
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    sums = run_backward<T, AsymQuantizer>(g.const_data_ptr<T>(), d.x.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(),
                                   d.geo, table);
  });
  const auto param_strides = c10::contiguous_strides(input_low.sizes());
  at::Tensor grad_low = at::Tensor(at::detail::empty_strided_cpu(input_low.sizes(), param_strides, at::kFloat));
  at::Tensor grad_range = at::Tensor(at::detail::empty_strided_cpu(input_range.sizes(),
                                                                   c10::contiguous_strides(input_range.sizes()), at::kFloat));
  float* gl = grad_low.mutable_data_ptr<float>();
  float* gr = grad_range.mutable_data_ptr<float>();
  for (int64_t c = 0; c < static_cast<int64_t>(sums.size()); ++c) {
    const Sums& s = sums[c];
    gl[c] = static_cast<float>(s.s2 + s.s1);
    gr[c] = static_cast<float>(prm.sign[c] * (s.s0 / prm.range[c] + s.s2));
  }
  return {grad_x, grad_low, grad_range};
}

namespace {

std::tuple<at::Tensor, at::Tensor> fake_quantize_symmetric_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                    const at::Tensor& scale, int64_t quant_min,
                                                                    int64_t quant_max, std::optional<int64_t> axis) {
  return symmetric_backward_cpu(grad, x, scale, quant_min, quant_max, axis, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_asymmetric_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
    int64_t levels, std::optional<int64_t> axis) {
  return asymmetric_backward_cpu(grad, x, input_low, input_range, levels, axis, false);
}

}  // namespace

// ---------------------------------------------------------------- parameters
// Same float32 operations, in the same order, as reference.py.

namespace {
inline float sgn(float v) { return static_cast<float>((v > 0.f) - (v < 0.f)); }
}  // namespace

// Element c of a per-tensor (numel 1, any shape) or per-channel (1-D, any stride) parameter.
struct ParamReader {
  const float* p;
  int64_t stride;
  explicit ParamReader(const at::Tensor& t) : p(t.const_data_ptr<float>()), stride(t.dim() == 1 ? t.stride(0) : 0) {}
  float operator[](int64_t c) const { return p[c * stride]; }
};

SymParams sym_params(const at::Tensor& scale, int64_t qh) {
  const ParamReader p(scale);
  const int64_t C = scale.numel();
  SymParams out{std::vector<float>(C), std::vector<float>(C), std::vector<float>(C)};
  for (int64_t c = 0; c < C; ++c) {
    out.s[c] = std::fabs(p[c]) + kEps;
    out.step[c] = out.s[c] / static_cast<float>(qh);
    out.sign[c] = sgn(p[c]);
  }
  return out;
}

// reference.adjust_asymmetric_range, then step = range / n and zp = round(-low / step).
AsymParams asym_params(const at::Tensor& input_low, const at::Tensor& input_range, int64_t levels) {
  const ParamReader lo_p(input_low), rg_p(input_range);
  const int64_t C = input_low.numel();
  const float n = static_cast<float>(levels);
  AsymParams out;
  for (auto* v : {&out.low, &out.range, &out.step, &out.zp, &out.sign}) v->resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const float raw_low = lo_p[c];
    const float raw_range = std::fabs(rg_p[c]) + kEps;
    const float l1 = std::min(raw_low, 0.f);
    const float h1 = std::max(raw_low + raw_range, 0.f);
    const float z = std::nearbyint(-l1 * n / (h1 - l1));
    const bool interior = z > 0.f && z < n;
    const float safe_z = interior ? z : 1.f;
    const float t = (safe_z - n) / safe_z;
    const float h2 = t * l1;
    const float l2 = h1 / (interior ? t : -1.f);
    const bool take_low_end = (h2 - l1) > (h1 - l2);
    const float adj_low = (interior && !take_low_end) ? l2 : l1;
    const float adj_high = (interior && take_low_end) ? h2 : h1;
    const float range = adj_high - adj_low;
    const float step = range / n;
    out.low[c] = adj_low;
    out.range[c] = range;
    out.step[c] = step;
    out.zp[c] = std::nearbyint(-adj_low / step);
    out.sign[c] = sgn(rg_p[c]);
  }
  return out;
}

TORCH_LIBRARY(purecomp, m) {
  // Fake (meta) kernels are registered from this Python module (torch.library.register_fake).
  m.set_python_module("purecomp.ops._registration");
  m.def("fake_quantize_symmetric(Tensor x, Tensor scale, int quant_min, int quant_max, int? axis=None) -> Tensor");
  m.def(
      "fake_quantize_symmetric_backward(Tensor grad, Tensor x, Tensor scale, int quant_min, int quant_max, "
      "int? axis=None) -> (Tensor, Tensor)");
  m.def(
      "fake_quantize_asymmetric(Tensor x, Tensor input_low, Tensor input_range, int levels, int? axis=None) "
      "-> Tensor");
  m.def(
      "fake_quantize_asymmetric_backward(Tensor grad, Tensor x, Tensor input_low, Tensor input_range, int levels, "
      "int? axis=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(purecomp, CPU, m) {
  m.impl("fake_quantize_symmetric", &symmetric_forward_cpu);
  m.impl("fake_quantize_symmetric_backward", &fake_quantize_symmetric_backward);
  m.impl("fake_quantize_asymmetric", &asymmetric_forward_cpu);
  m.impl("fake_quantize_asymmetric_backward", &fake_quantize_asymmetric_backward);
}

}  // namespace purecomp
