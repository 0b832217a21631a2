// Activation binarization CPU kernels (scale-threshold, paper eq. 5), per-channel thresholds.
//
// The canonical definition is ops/binarize_reference.py (activation_binarize_reference); the
// forward equals it bit for bit for float32, float16 and bfloat16 x (compared in float32), the
// backward to float tolerance. s = scale (one value), t_c = threshold (one value per channel),
// thr_c = s * t_c in float32 as in the reference:
//
//   out  = s if x > thr_c else +0                       (x == thr_c gives 0)
//   d/dx = g on 0 <= x <= s, else 0
//   d/ds = (sum over !(x > s) of g (out - x)) / s + sum over x > s of g
//   d/dt_c = -(sum over channel c of g on 0 < x < s)
//
// The reference's output is out + (surrogate - surrogate), exactly out while its straight-through
// surrogate is finite and NaN otherwise (x NaN or -inf, |x| / s overflowing, a non-finite
// threshold, s <= 0, ...). The forward takes a fast path (a compare and a select) for vectors whose
// elements all satisfy |x| <= bound, a bound under which the surrogate is provably finite, and
// evaluates the surrogate exactly as the reference does for the others.
//
// Forward: one pass over x writing out. Backward: one pass over (grad, x) writing grad_x and
// summing, per channel, g (out - x) on !(x > s), g on 0 < x < s and g on x > s in fixed per-chunk
// partials (cpu_kernels.h: no atomics, independent of the thread count).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "binarize.h"
#include "cpu_kernels.h"

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace purecomp {
namespace {

using namespace cpu;

// |x| <= bound (and the parameters checked in make_table) keeps every term of the reference's
// surrogate below ~4e30: (out - x) / s <= 1 + 1e30, s * that <= 2e30, |t| <= 1e30.
constexpr float kLimit = 1e30f;

struct BinTable {
  std::vector<float> thr, t;  // per position (channel, or lane in lane mode): s * t_c and t_c
  float s, bound;             // bound < 0: every element takes the exact path
};

struct BinOp {
  using Table = BinTable;
  Vec thr, t, s, bound;

  static BinOp splat(const Table& tb, int64_t p) { return {Vec(tb.thr[p]), Vec(tb.t[p]), Vec(tb.s), Vec(tb.bound)}; }
  static BinOp lanes(const Table& tb, int64_t p) {
    return {Vec::loadu(tb.thr.data() + p), Vec::loadu(tb.t.data() + p), Vec(tb.s), Vec(tb.bound)};
  }

  // s or +0 (comparison masks are all-ones lanes)
  Vec value(const Vec& x) const { return (x > thr) & s; }

  // The reference's out + (surrogate - surrogate), with its float32 operations in its order.
  Vec exact(const Vec& x, const Vec& out) const {
    const Vec zero(0.f);
    const Vec pass_x = (x >= zero) & (x <= s);
    const Vec slope_s = Vec::blendv((out - x) / s, Vec(1.f), x > s);
    const Vec slope_t = Vec::blendv(Vec(-0.f), Vec(-1.f), (x > zero) & (x < s));
    const Vec surrogate = ((x & pass_x) + s * slope_s) + t * slope_t;
    return out + (surrogate - surrogate);
  }

  Vec forward(const Vec& x) const {
    const Vec out = value(x);
    if ((x.abs() <= bound).zero_mask() == 0) return out;  // every lane ordinary (NaN is not)
    return exact(x, out);
  }

  // grad_x; t0 = g (out - x) on !(x > s) (NaN x included, as in the reference), t1 = g on 0 < x < s,
  // t2 = g on x > s.
  void terms(const Vec& x, const Vec& g, Vec& dx, Vec& t0, Vec& t1, Vec& t2) const {
    const Vec zero(0.f);
    const Vec above = x > s;
    dx = g & ((x >= zero) & (x <= s));
    t0 = Vec::blendv(g * (value(x) - x), zero, above);
    t1 = g & ((x > zero) & (x < s));
    t2 = g & above;
  }

#if defined(CPU_CAPABILITY_AVX512)
  // terms() accumulated with AVX-512 mask registers: the same values.
  void accumulate(const Vec& x, const Vec& g, Vec& dx, Vec& a0, Vec& a1, Vec& a2) const {
    const __m512 xv = x, gv = g, sv = s, zero = _mm512_setzero_ps();
    const __mmask16 above = _mm512_cmp_ps_mask(xv, sv, _CMP_GT_OQ);
    const __mmask16 nonneg = _mm512_cmp_ps_mask(xv, zero, _CMP_GE_OQ);
    const __mmask16 positive = _mm512_cmp_ps_mask(xv, zero, _CMP_GT_OQ);
    const __mmask16 upto = _mm512_cmp_ps_mask(xv, sv, _CMP_LE_OQ);
    const __mmask16 below_s = _mm512_cmp_ps_mask(xv, sv, _CMP_LT_OQ);
    const __mmask16 on = _mm512_cmp_ps_mask(xv, thr, _CMP_GT_OQ);
    const __m512 out = _mm512_maskz_mov_ps(on, sv);
    dx = _mm512_maskz_mov_ps(_mm512_kand(nonneg, upto), gv);
    a0 = _mm512_mask_add_ps(a0, _mm512_knot(above), a0, _mm512_mul_ps(gv, _mm512_sub_ps(out, xv)));
    a1 = _mm512_mask_add_ps(a1, _mm512_kand(positive, below_s), a1, gv);
    a2 = _mm512_mask_add_ps(a2, above, a2, gv);
  }
#else
  void accumulate(const Vec& x, const Vec& g, Vec& dx, Vec& a0, Vec& a1, Vec& a2) const {
    Vec t0, t1, t2;
    terms(x, g, dx, t0, t1, t2);
    a0 += t0;
    a1 += t1;
    a2 += t2;
  }
#endif
};

// Checks the inputs; returns the axis made non-negative.
int64_t check_inputs(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& threshold, int64_t axis) {
  TORCH_CHECK(x.device().is_cpu(), "purecomp activation binarize (CPU kernel): x must be on the CPU");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "purecomp activation binarize: x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.dim() > 0 && axis >= -x.dim() && axis < x.dim(), "purecomp activation binarize: axis ", axis,
              " is out of range for an input of ", x.dim(), " dimensions");
  const int64_t a = axis < 0 ? axis + x.dim() : axis;
  for (const auto* p : {&scale, &threshold}) {
    TORCH_CHECK(p->device().is_cpu() && p->scalar_type() == at::kFloat,
                "purecomp activation binarize: scale and threshold must be float32 CPU tensors, got ",
                p->scalar_type());
  }
  TORCH_CHECK(scale.numel() == 1, "purecomp activation binarize: scale must hold one value, got shape ",
              scale.sizes());
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == x.size(a),
              "purecomp activation binarize: threshold must have shape (", x.size(a), ",), got shape ",
              threshold.sizes());
  return a;
}

BinTable make_table(const at::Tensor& scale, const at::Tensor& threshold, const Geometry& geo) {
  const float s = *scale.const_data_ptr<float>();
  const float* tp = threshold.const_data_ptr<float>();
  const int64_t stride = threshold.stride(0);
  const int64_t C = threshold.size(0);
  std::vector<float> thr(C), t(C);
  bool ordinary = std::isfinite(s) && s >= FLT_MIN && s <= kLimit;
  for (int64_t c = 0; c < C; ++c) {
    t[c] = tp[c * stride];
    thr[c] = s * t[c];
    ordinary = ordinary && std::isfinite(t[c]) && std::fabs(t[c]) <= kLimit;
  }
  const float bound = ordinary ? std::min(kLimit, kLimit * s) : -1.f;
  return {layout_table(std::move(thr), geo, 0.f), layout_table(std::move(t), geo, 0.f), s, bound};
}

at::Tensor contiguous_empty(at::IntArrayRef sizes) {
  return at::Tensor(at::detail::empty_strided_cpu(sizes, c10::contiguous_strides(sizes), at::kFloat));
}

}  // namespace

at::Tensor activation_binarize_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& threshold,
                                   int64_t axis) {
  const int64_t a = check_inputs(x, scale, threshold, axis);
  const Dense d = make_dense(x, a);
  at::Tensor out = empty_like_dense(d);
  const BinTable table = make_table(scale, threshold, d.geo);
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run_forward<T, BinOp>(d.x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), d.geo, table);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> activation_binarize_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& threshold, int64_t axis,
    bool reuse_grad) {
  const int64_t a = check_inputs(x, scale, threshold, axis);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "purecomp activation binarize backward: grad must match x in shape, dtype and device");
  const Dense d = make_dense(x, a);
  const at::Tensor g = grad_like_dense(grad, d);
  at::Tensor grad_x = grad_x_buffer(grad, g, d, reuse_grad);
  const BinTable table = make_table(scale, threshold, d.geo);
  std::vector<Sums> sums;
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    sums = run_backward<T, BinOp>(g.const_data_ptr<T>(), d.x.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(),
                                  d.geo, table);
  });
  const int64_t C = threshold.size(0);
  at::Tensor grad_scale = contiguous_empty(scale.sizes());
  at::Tensor grad_threshold = contiguous_empty(threshold.sizes());
  float* gt = grad_threshold.mutable_data_ptr<float>();
  double below = 0.0, above = 0.0;
  for (int64_t c = 0; c < C; ++c) {  // channels in order: deterministic
    below += sums[c].s0;
    above += sums[c].s2;
    gt[c] = static_cast<float>(-sums[c].s1);
  }
  *grad_scale.mutable_data_ptr<float>() = static_cast<float>(below / static_cast<double>(table.s) + above);
  return {grad_x, grad_scale, grad_threshold};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> activation_binarize_backward_op(const at::Tensor& grad,
                                                                               const at::Tensor& x,
                                                                               const at::Tensor& scale,
                                                                               const at::Tensor& threshold,
                                                                               int64_t axis) {
  return activation_binarize_backward_cpu(grad, x, scale, threshold, axis, false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(purecomp, m) {
  // Fake (meta) kernels and vmap rules are registered from this Python module.
  m.set_python_module("purecomp.ops._registration");
  m.def("activation_binarize(Tensor x, Tensor scale, Tensor threshold, int axis) -> Tensor");
  m.def(
      "activation_binarize_backward(Tensor grad, Tensor x, Tensor scale, Tensor threshold, int axis) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(purecomp, CPU, m) {
  m.impl("activation_binarize", &activation_binarize_cpu);
  m.impl("activation_binarize_backward", &activation_binarize_backward_op);
}

}  // namespace purecomp
