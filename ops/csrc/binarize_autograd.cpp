// Autograd kernel of purecomp::activation_binarize (eager, C++), built like the fake-quantize ones
// (fake_quantize_autograd.cpp):
//
// - first-order backward (grad mode off) runs the one-pass C++ backward kernel, called directly
//   for plain CPU tensors (recorded for profilers under the backward op's name) and writing
//   grad_x into the incoming gradient's buffer when this node owns it;
// - a backward that is itself differentiated (create_graph=True) is written with ATen ops: the
//   reference's gradient is linear in g with detached coefficients,
//     grad_x = g on 0 <= x <= s,  grad_s = sum(g slope_s),  grad_t = sum_c(g slope_t),
//     slope_s = 1 on x > s else (out - x) / s,  slope_t = -1 on 0 < x < s else 0,
//   so double backward equals the reference's;
// - activation_binarize_backward refuses to be differentiated.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "autograd_util.h"
#include "binarize.h"

namespace purecomp {
namespace {

using namespace autograd_util;
using torch::autograd::variable_list;

using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&, int64_t);

class BinarizeFunction : public torch::autograd::Function<BinarizeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& threshold, int64_t axis) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, scale, threshold});
    ctx->saved_data["axis"] = axis;
    static const auto op = op_handle<ForwardFn>("purecomp::activation_binarize");
    return op.call(x, scale, threshold, axis);
  }

  // grads by reference: the node's own gradient buffers (see owned()).
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1], &threshold = saved[2];
    const int64_t axis = ctx->saved_data["axis"].toInt();
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    if (!at::GradMode::is_enabled()) {
      if (direct_cpu_call({g, x, scale, threshold})) {
        RECORD_FUNCTION("purecomp::activation_binarize_backward", std::vector<c10::IValue>({g, x, scale, threshold}));
        auto [grad_x, grad_scale, grad_threshold] =
            activation_binarize_backward_cpu(g, x, scale, threshold, axis, owned(g));
        return {grad_x, grad_scale, grad_threshold, at::Tensor()};
      }
      static const auto op = op_handle<BackwardFn>("purecomp::activation_binarize_backward");
      auto [grad_x, grad_scale, grad_threshold] = op.call(g, x, scale, threshold, axis);
      return {grad_x, grad_scale, grad_threshold, at::Tensor()};
    }
    // Differentiable form: coefficients without gradient, linear in g (the reference's vjp).
    at::Tensor pass_x, slope_s, slope_t;
    {
      at::NoGradGuard no_grad;
      const at::Tensor xf = x.detach().to(at::kFloat);
      const at::Tensor s = scale.detach().reshape({});
      std::vector<int64_t> shape(x.dim(), 1);
      shape[axis < 0 ? axis + x.dim() : axis] = -1;
      const at::Tensor t = threshold.detach().reshape(shape);
      const at::Tensor out = at::where(xf > s * t, s, at::zeros_like(s));
      pass_x = at::logical_and(xf >= 0, xf <= s);
      slope_s = at::where(xf > s, at::ones_like(xf), (out - xf) / s);
      slope_t = -at::logical_and(xf > 0, xf < s).to(at::kFloat);
    }
    const at::Tensor gf = g.to(at::kFloat);
    const at::Tensor grad_x = at::where(pass_x, gf, at::zeros_like(gf)).to(x.scalar_type());
    return {grad_x, (gf * slope_s).sum().reshape(scale.sizes()), reduce_to(gf * slope_t, axis, threshold),
            at::Tensor()};
  }
};

at::Tensor binarize_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& threshold, int64_t axis) {
  return BinarizeFunction::apply(x, scale, threshold, axis);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> binarize_backward_autograd(const at::Tensor& grad, const at::Tensor& x,
                                                                          const at::Tensor& scale,
                                                                          const at::Tensor& threshold, int64_t axis) {
  check_not_differentiated("purecomp::activation_binarize_backward", {grad, x, scale, threshold});
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = op_handle<BackwardFn>("purecomp::activation_binarize_backward");
  return op.call(grad, x, scale, threshold, axis);
}

}  // namespace

TORCH_LIBRARY_IMPL(purecomp, Autograd, m) {
  m.impl("activation_binarize", &binarize_autograd);
  m.impl("activation_binarize_backward", &binarize_backward_autograd);
}

}  // namespace purecomp
