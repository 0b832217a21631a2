// Autograd kernels of purecomp::fake_quantize_symmetric / _asymmetric (eager, C++).
//
// First-order backward (grad mode off, the usual loss.backward()) runs the one-pass C++
// backward kernel. For plain CPU tensors (no subclass, no dispatch mode or functorch transform
// active) it is called directly rather than through the dispatcher (it still shows in the
// profiler under the backward op's name), and when this node owns the incoming gradient (no
// other reference to it or to its storage, memory from the default CPU allocator) grad_x is
// written into the gradient's own buffer: no allocation, and the buffer is already in cache.
//
// A backward that is itself differentiated (create_graph=True) is written with ATen ops
// instead, so that double backward equals the reference's: the reference's gradient is linear
// in the incoming gradient g with detached coefficients,
//   grad_x = g * inside,  grad_param = sum(g * factor),
// so its own derivative flows only through g. The *_backward ops are not differentiable and
// say so when asked to be.
//
// These kernels serve eager autograd only; under torch.func transforms purecomp routes to the
// reference (ops/dispatch.py) or to the Python autograd.Function wrappers (ops/autograd.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "autograd_util.h"
#include "fake_quantize.h"

namespace purecomp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using SymForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, std::optional<int64_t>);
using SymBackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          int64_t, int64_t, std::optional<int64_t>);
using AsymForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                 std::optional<int64_t>);
using AsymBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                      const at::Tensor&, const at::Tensor&, int64_t,
                                                                      std::optional<int64_t>);

using namespace autograd_util;

class SymmetricFunction : public torch::autograd::Function<SymmetricFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale, int64_t quant_min,
                            int64_t quant_max, std::optional<int64_t> axis) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, scale});
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    save_axis(ctx, axis);
    static const auto op = op_handle<SymForwardFn>("purecomp::fake_quantize_symmetric");
    return op.call(x, scale, quant_min, quant_max, axis);
  }

  // grads by reference: the node's own gradient buffers (see owned()).
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1];
    const int64_t ql = ctx->saved_data["quant_min"].toInt(), qh = ctx->saved_data["quant_max"].toInt();
    const auto axis = saved_axis(ctx);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    if (!at::GradMode::is_enabled()) {
      if (direct_cpu_call({g, x, scale})) {
        RECORD_FUNCTION("purecomp::fake_quantize_symmetric_backward", std::vector<c10::IValue>({g, x, scale}));
        auto [grad_x, grad_scale] = symmetric_backward_cpu(g, x, scale, ql, qh, axis, owned(g));
        return {grad_x, grad_scale, at::Tensor(), at::Tensor(), at::Tensor()};
      }
      static const auto op = op_handle<SymBackwardFn>("purecomp::fake_quantize_symmetric_backward");
      auto [grad_x, grad_scale] = op.call(g, x, scale, ql, qh, axis);
      return {grad_x, grad_scale, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // Differentiable form: coefficients without gradient, linear in g.
    at::Tensor inside, factor;
    {
      at::NoGradGuard no_grad;
      const SymParams prm = sym_params(scale.detach(), qh);
      const at::Tensor xf = x.detach().to(at::kFloat);
      const at::Tensor s = channel_tensor(prm.s, x, axis), step = channel_tensor(prm.step, x, axis);
      const at::Tensor r = at::round(xf / step);
      const double lo = static_cast<double>(ql), hi = static_cast<double>(qh);
      const at::Tensor out = at::clamp(r, at::Scalar(lo), at::Scalar(hi)) * step;
      inside = at::logical_and(r >= lo, r <= hi);
      const at::Tensor outside = at::where(r > hi, at::Scalar(1.0), at::Scalar(lo / hi));
      factor = at::where(inside, (out - xf) / s, outside) * channel_tensor(prm.sign, x, axis);
    }
    const at::Tensor gf = g.to(at::kFloat);
    const at::Tensor grad_x = (gf * inside).to(x.scalar_type());
    return {grad_x, reduce_to(gf * factor, axis, scale), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class AsymmetricFunction : public torch::autograd::Function<AsymmetricFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& input_low,
                            const at::Tensor& input_range, int64_t levels, std::optional<int64_t> axis) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, input_low, input_range});
    ctx->saved_data["levels"] = levels;
    save_axis(ctx, axis);
    static const auto op = op_handle<AsymForwardFn>("purecomp::fake_quantize_asymmetric");
    return op.call(x, input_low, input_range, levels, axis);
  }

  // grads by reference: the node's own gradient buffers (see owned()).
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &input_low = saved[1], &input_range = saved[2];
    const int64_t n = ctx->saved_data["levels"].toInt();
    const auto axis = saved_axis(ctx);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    if (!at::GradMode::is_enabled()) {
      if (direct_cpu_call({g, x, input_low, input_range})) {
        RECORD_FUNCTION("purecomp::fake_quantize_asymmetric_backward",
                        std::vector<c10::IValue>({g, x, input_low, input_range}));
        auto [grad_x, grad_low, grad_range] =
            asymmetric_backward_cpu(g, x, input_low, input_range, n, axis, owned(g));
        return {grad_x, grad_low, grad_range, at::Tensor(), at::Tensor()};
      }
      static const auto op = op_handle<AsymBackwardFn>("purecomp::fake_quantize_asymmetric_backward");
      auto [grad_x, grad_low, grad_range] = op.call(g, x, input_low, input_range, n, axis);
      return {grad_x, grad_low, grad_range, at::Tensor(), at::Tensor()};
    }
    at::Tensor inside, outside, range_factor;
    {
      at::NoGradGuard no_grad;
      const AsymParams prm = asym_params(input_low.detach(), input_range.detach(), n);
      const at::Tensor xf = x.detach().to(at::kFloat);
      const at::Tensor low = channel_tensor(prm.low, x, axis), step = channel_tensor(prm.step, x, axis);
      const at::Tensor r = at::round((xf - low) / step);
      const double top = static_cast<double>(n);
      const at::Tensor out = (at::clamp(r, at::Scalar(0.0), at::Scalar(top)) - channel_tensor(prm.zp, x, axis)) * step;
      inside = at::logical_and(r >= 0.0, r <= top);
      outside = at::logical_not(inside);
      const at::Tensor above = (r > top).to(at::kFloat);
      range_factor = at::where(inside, (out - xf) / channel_tensor(prm.range, x, axis), above) *
                     channel_tensor(prm.sign, x, axis);
    }
    const at::Tensor gf = g.to(at::kFloat);
    return {(gf * inside).to(x.scalar_type()), reduce_to(gf * outside, axis, input_low),
            reduce_to(gf * range_factor, axis, input_range), at::Tensor(), at::Tensor()};
  }
};

at::Tensor symmetric_autograd(const at::Tensor& x, const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                              std::optional<int64_t> axis) {
  return SymmetricFunction::apply(x, scale, quant_min, quant_max, axis);
}

at::Tensor asymmetric_autograd(const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
                               int64_t levels, std::optional<int64_t> axis) {
  return AsymmetricFunction::apply(x, input_low, input_range, levels, axis);
}

std::tuple<at::Tensor, at::Tensor> symmetric_backward_autograd(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& scale, int64_t quant_min,
                                                               int64_t quant_max, std::optional<int64_t> axis) {
  check_not_differentiated("purecomp::fake_quantize_symmetric_backward", {grad, x, scale});
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = op_handle<SymBackwardFn>("purecomp::fake_quantize_symmetric_backward");
  return op.call(grad, x, scale, quant_min, quant_max, axis);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> asymmetric_backward_autograd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
    int64_t levels, std::optional<int64_t> axis) {
  check_not_differentiated("purecomp::fake_quantize_asymmetric_backward", {grad, x, input_low, input_range});
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = op_handle<AsymBackwardFn>("purecomp::fake_quantize_asymmetric_backward");
  return op.call(grad, x, input_low, input_range, levels, axis);
}

}  // namespace

TORCH_LIBRARY_IMPL(purecomp, Autograd, m) {
  m.impl("fake_quantize_symmetric", &symmetric_autograd);
  m.impl("fake_quantize_asymmetric", &asymmetric_autograd);
  m.impl("fake_quantize_symmetric_backward", &symmetric_backward_autograd);
  m.impl("fake_quantize_asymmetric_backward", &asymmetric_backward_autograd);
}

}  // namespace purecomp
