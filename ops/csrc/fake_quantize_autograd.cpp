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

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Per-channel values as a tensor that broadcasts over x (reference.broadcast_param).
at::Tensor channel_tensor(const std::vector<float>& values, const at::Tensor& x, std::optional<int64_t> axis) {
  at::Tensor t = at::tensor(values, at::TensorOptions().dtype(at::kFloat));
  if (!axis.has_value()) return t.reshape({});
  std::vector<int64_t> shape(x.dim(), 1);
  shape[*axis < 0 ? *axis + x.dim() : *axis] = -1;
  return t.reshape(shape);
}

// Sum over the axes a parameter broadcasts over (all, or all but the channel axis), in its shape.
at::Tensor reduce_to(const at::Tensor& terms, std::optional<int64_t> axis, const at::Tensor& param) {
  if (!axis.has_value()) return terms.sum().reshape(param.sizes());
  const int64_t a = *axis < 0 ? *axis + terms.dim() : *axis;
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < terms.dim(); ++d) {
    if (d != a) dims.push_back(d);
  }
  return (dims.empty() ? terms : terms.sum(dims)).reshape(param.sizes());
}

std::optional<int64_t> saved_axis(AutogradContext* ctx) {
  return ctx->saved_data["axis"].toOptional<int64_t>();
}

void save_axis(AutogradContext* ctx, std::optional<int64_t> axis) {
  ctx->saved_data["axis"] = axis.has_value() ? c10::IValue(*axis) : c10::IValue();
}

// A dense CPU tensor without subclass, conjugate/negative view or other extra dispatch keys.
bool plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet allowed({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                            c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutocastCPU});
  return t.defined() && t.layout() == at::kStrided && allowed.isSupersetOf(t.key_set());
}

// True when the dispatcher would send these tensors straight to the CPU kernel: plain tensors and
// no Python dispatch mode, functorch transform or functionalization active on this thread.
bool direct_cpu_call(std::initializer_list<at::Tensor> tensors) {
  static const c10::DispatchKeySet intercepting({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                                 c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
                                                 c10::DispatchKey::FuncTorchDynamicLayerBackMode,
                                                 c10::DispatchKey::Functionalize, c10::DispatchKey::PreDispatch});
  if (c10::impl::tls_local_dispatch_key_set().included_.has_any(intercepting)) return false;
  for (const auto& t : tensors) {
    if (!plain_cpu(t)) return false;
  }
  return true;
}

// The caller holds the only reference to g and to its storage, and the memory is the default
// CPU allocator's (not borrowed from numpy, DLPack, ...): g may be overwritten.
bool owned(const at::Tensor& g) {
  return g.use_count() == 1 && g.storage().use_count() == 1 && !g.is_inference() &&
         g.storage().data_ptr().get_deleter() == c10::GetDefaultCPUAllocator()->raw_deleter();
}

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

void check_not_differentiated(const char* name, std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& t : inputs) {
    TORCH_CHECK(!t.requires_grad(), name,
                " is not differentiable; differentiate the forward op (its backward is) or use the "
                "pure-torch reference in purecomp.ops.reference");
  }
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
