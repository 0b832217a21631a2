// Per-channel parameters of the fake quantizers, computed with the same float32 operations,
// in the same order, as ops/reference.py. Shared by the CPU kernels and the C++ autograd.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
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

}  // namespace purecomp
