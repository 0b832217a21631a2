// Entry points of the activation binarization CPU kernels (binarize.cpp), shared with the C++
// autograd (binarize_autograd.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace purecomp {

// out = s if x > s * t_c else 0 (s = scale, one value; t = threshold, shape (C,) along axis).
at::Tensor activation_binarize_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& threshold,
                                   int64_t axis);

// (grad_x, grad_scale, grad_threshold) of ops/binarize_reference.py. The registered CPU op calls
// it with reuse_grad = false; the autograd kernel with reuse_grad = true when it owns `grad`
// (grad_x is then written into grad's buffer when that has x's dense layout).
std::tuple<at::Tensor, at::Tensor, at::Tensor> activation_binarize_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& threshold, int64_t axis,
    bool reuse_grad);

}  // namespace purecomp
