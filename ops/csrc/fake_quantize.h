// Per-channel parameters of the fake quantizers, computed with the same float32 operations,
// in the same order, as ops/reference.py, and the CPU kernels' entry points. Shared by the CPU
// kernels and the C++ autograd.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace purecomp {

// Symmetric: s = |scale| + 1e-16, step = s / qh, sign = sgn(scale); one entry per channel.
struct SymParams {
  std::vector<float> s, step, sign;
};
SymParams sym_params(const at::Tensor& scale, int64_t qh);

// Asymmetric: low and range after reference.adjust_asymmetric_range (input range |range| + 1e-16),
// step = range / n, zp = round(-low / step), sign = sgn(input_range); one entry per channel.
struct AsymParams {
  std::vector<float> low, range, step, zp, sign;
};
AsymParams asym_params(const at::Tensor& input_low, const at::Tensor& input_range, int64_t levels);

// The CPU kernels (fake_quantize.cpp). The registered CPU ops call the backward ones with
// reuse_grad = false; the autograd kernels call them directly for plain CPU tensors, with
// reuse_grad = true when they own `grad` (no other reference to it or its storage): grad_x is
// then written into grad's buffer when that has x's dense layout, and grad itself is returned.
at::Tensor symmetric_forward_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                                 std::optional<int64_t> axis);
std::tuple<at::Tensor, at::Tensor> symmetric_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& scale, int64_t quant_min,
                                                          int64_t quant_max, std::optional<int64_t> axis,
                                                          bool reuse_grad);
at::Tensor asymmetric_forward_cpu(const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
                                  int64_t levels, std::optional<int64_t> axis);
std::tuple<at::Tensor, at::Tensor, at::Tensor> asymmetric_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
    int64_t levels, std::optional<int64_t> axis, bool reuse_grad);

}  // namespace purecomp
