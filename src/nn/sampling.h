// Downsample2D / Upsample2D as diffusers.models.downsampling / upsampling with use_conv=True.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/types.h>

#include "nn/layers.h"

namespace lightning::nn {

// Stride-2 3x3 conv. padding 1 is symmetric (the UNet's downsample_padding); padding 0 pads
// right and bottom by one first (the VAE encoder's convention).
class Downsample2DImpl : public torch::nn::Cloneable<Downsample2DImpl> {
 public:
  Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding = 1);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [B, C, H, W] -> [B, out, H/2, W/2]

  int64_t channels, out_channels, padding;
  Conv2d conv{nullptr};
};
TORCH_MODULE(Downsample2D);

// Nearest-neighbour x2 (or to an explicit size), then a 3x3 conv.
class Upsample2DImpl : public torch::nn::Cloneable<Upsample2DImpl> {
 public:
  Upsample2DImpl(int64_t channels, int64_t out_channels);
  void reset() override;
  // x [B, C, H, W] -> [B, out, 2H, 2W], or [B, out, size[0], size[1]] when size is given.
  torch::Tensor forward(const torch::Tensor& x, c10::optional<std::vector<int64_t>> size = {});

  int64_t channels, out_channels;
  Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

}  // namespace lightning::nn
