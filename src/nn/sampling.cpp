#include "nn/sampling.h"

#include <torch/nn/functional/upsampling.h>

namespace lightning::nn {

Downsample2DImpl::Downsample2DImpl(int64_t channels_, int64_t out_channels_, int64_t padding_)
    : channels(channels_), out_channels(out_channels_), padding(padding_) {
  reset();
}

void Downsample2DImpl::reset() {
  conv = register_module("conv", Conv2d(channels, out_channels, 3, 2, padding));
}

torch::Tensor Downsample2DImpl::forward(const torch::Tensor& x) {
  if (padding == 0) return conv(torch::constant_pad_nd(x, {0, 1, 0, 1}));
  return conv(x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels_, int64_t out_channels_)
    : channels(channels_), out_channels(out_channels_) {
  reset();
}

void Upsample2DImpl::reset() {
  conv = register_module("conv", Conv2d(channels, out_channels, 3, 1, 1));
}

torch::Tensor Upsample2DImpl::forward(const torch::Tensor& x,
                                      c10::optional<std::vector<int64_t>> size) {
  namespace F = torch::nn::functional;
  const std::vector<int64_t> out_size =
      size ? *size : std::vector<int64_t>{x.size(2) * 2, x.size(3) * 2};
  // Older libtorch has no bf16 nearest upsampling on CPU (pytorch#86679); as diffusers does,
  // go through f32, which is exact for a copy.
  const bool via_f32 = x.scalar_type() == torch::kBFloat16;
  auto h = F::interpolate(via_f32 ? x.to(torch::kFloat32) : x,
                          F::InterpolateFuncOptions().size(out_size).mode(torch::kNearest));
  if (via_f32) h = h.to(torch::kBFloat16);
  return conv(h);
}

}  // namespace lightning::nn
