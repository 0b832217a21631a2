// Helpers of purecomp's C++ autograd kernels (eager autograd of the ops in csrc/): op handles,
// per-channel tensors for the differentiable (create_graph) form of a backward, and the checks
// that decide whether a backward may call its CPU kernel directly and reuse the gradient buffer.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

namespace purecomp {
namespace autograd_util {

using torch::autograd::AutogradContext;

template <typename Fn>
inline c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Per-channel values as a tensor that broadcasts over x (reference.broadcast_param).
inline at::Tensor channel_tensor(const std::vector<float>& values, const at::Tensor& x, std::optional<int64_t> axis) {
  at::Tensor t = at::tensor(values, at::TensorOptions().dtype(at::kFloat));
  if (!axis.has_value()) return t.reshape({});
  std::vector<int64_t> shape(x.dim(), 1);
  shape[*axis < 0 ? *axis + x.dim() : *axis] = -1;
  return t.reshape(shape);
}

// Sum over the axes a parameter broadcasts over (all, or all but the channel axis), in its shape.
inline at::Tensor reduce_to(const at::Tensor& terms, std::optional<int64_t> axis, const at::Tensor& param) {
  if (!axis.has_value()) return terms.sum().reshape(param.sizes());
  const int64_t a = *axis < 0 ? *axis + terms.dim() : *axis;
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < terms.dim(); ++d) {
    if (d != a) dims.push_back(d);
  }
  return (dims.empty() ? terms : terms.sum(dims)).reshape(param.sizes());
}

inline std::optional<int64_t> saved_axis(AutogradContext* ctx) {
  return ctx->saved_data["axis"].toOptional<int64_t>();
}

inline void save_axis(AutogradContext* ctx, std::optional<int64_t> axis) {
  ctx->saved_data["axis"] = axis.has_value() ? c10::IValue(*axis) : c10::IValue();
}

// A dense CPU tensor without subclass, conjugate/negative view or other extra dispatch keys.
inline bool plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet allowed({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                            c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutocastCPU});
  return t.defined() && t.layout() == at::kStrided && allowed.isSupersetOf(t.key_set());
}

// True when the dispatcher would send these tensors straight to the CPU kernel: plain tensors and
// no Python dispatch mode, functorch transform or functionalization active on this thread.
inline bool direct_cpu_call(std::initializer_list<at::Tensor> tensors) {
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
inline bool owned(const at::Tensor& g) {
  return g.use_count() == 1 && g.storage().use_count() == 1 && !g.is_inference() &&
         g.storage().data_ptr().get_deleter() == c10::GetDefaultCPUAllocator()->raw_deleter();
}

inline void check_not_differentiated(const char* name, std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& t : inputs) {
    TORCH_CHECK(!t.requires_grad(), name,
                " is not differentiable; differentiate the forward op (its backward is) or use the "
                "pure-torch reference in purecomp.ops.reference");
  }
}

}  // namespace autograd_util
}  // namespace purecomp
