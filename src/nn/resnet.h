// ResnetBlock2D as diffusers.models.resnet.ResnetBlock2D with time_embedding_norm "default",
// pre-norm, SiLU: GroupNorm -> SiLU -> conv1 -> (+ time_emb_proj(SiLU(temb))) -> GroupNorm ->
// SiLU -> dropout -> conv2, plus a 1x1 conv_shortcut when the channel count changes.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/types.h>

#include "nn/layers.h"

namespace lightning::nn {

struct ResnetBlock2DOptions {
  ResnetBlock2DOptions(int64_t in_channels, int64_t out_channels)
      : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(int64_t, temb_channels) = 512;  // 0: no time embedding input
  TORCH_ARG(int64_t, groups) = 32;
  TORCH_ARG(double, eps) = 1e-6;  // the UNet passes its norm_eps (1e-5)
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(double, output_scale_factor) = 1.0;
};

class ResnetBlock2DImpl : public torch::nn::Cloneable<ResnetBlock2DImpl> {
 public:
  explicit ResnetBlock2DImpl(const ResnetBlock2DOptions& options);
  void reset() override;
  // x [B, in, H, W], temb [B, temb_channels] (undefined if temb_channels == 0) -> [B, out, H, W]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb);

  ResnetBlock2DOptions options;
  GroupNorm norm1{nullptr}, norm2{nullptr};
  Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  Linear time_emb_proj{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

}  // namespace lightning::nn
