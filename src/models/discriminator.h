// The discriminator of progressive adversarial distillation (METHOD.md §3): a trainable copy of
// the teacher UNet's encoder (time and text conditioning, conv_in, down blocks) and mid block as
// the backbone d(x, t, c), with two heads:
//   conditional   D(x_t', x_t, t, t', c) = head(concat_channels(d(x_t', t', c), d(x_t, t, c)))
//   unconditional D'(x_t', t', c)         = head'(d(x_t', t', c))
// Heads return logits (sigmoid is folded into the losses of distill/objectives.h).
//
// The paper gives the head's kind but not its size: blocks of a 4x4 stride-2 convolution,
// GroupNorm and SiLU. Here `blocks` such blocks of `channels` channels, then a 1x1 convolution to
// one channel averaged over the remaining positions (one value per sample at any resolution,
// PatchGAN-style). Both are configurable in the distillation recipe.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>

#include "models/unet.h"
#include "nn/layers.h"

namespace lightning::models {

struct DiscriminatorHeadConfig {
  int64_t channels = 0;      // width of the blocks; 0: the backbone's output channels
  int64_t blocks = 2;        // 4x4 stride-2 blocks, each halving H and W
  int64_t norm_groups = 32;  // GroupNorm groups (lowered to the largest divisor of channels)
};

class DiscriminatorHeadImpl : public torch::nn::Cloneable<DiscriminatorHeadImpl> {
 public:
  DiscriminatorHeadImpl(int64_t in_channels, const DiscriminatorHeadConfig& config);
  void reset() override;
  // [B, in_channels, H, W] -> logits [B]. Throws Error when H or W is too small for the blocks.
  torch::Tensor forward(const torch::Tensor& features);

  int64_t in_channels;
  DiscriminatorHeadConfig config;
  torch::nn::ModuleList convs{nullptr}, norms{nullptr};
  nn::Conv2d out{nullptr};
};
TORCH_MODULE(DiscriminatorHead);

// The smallest side of the UNet's input (latents, or pixels for a pixel-space UNet) whose encoder
// features (halved, rounding up, at each down-sampling block) give each of the head's blocks at
// least 2x2 features: for SDXL and 3 head blocks, 29 latents (232 pixels).
int64_t smallest_discriminator_input(const UNetConfig& unet, const DiscriminatorHeadConfig& head);

class DiscriminatorImpl : public torch::nn::Module {
 public:
  DiscriminatorImpl(const UNetConfig& unet_config, const DiscriminatorHeadConfig& head);

  // Copies the teacher's encoder and mid-block weights into the backbone (the heads keep their
  // fresh initialisation). Throws Error when the teacher's config differs.
  void init_backbone_from(UNet2DConditionModel& teacher);

  // d(x, t, c): the backbone's features [B, C, h, w].
  torch::Tensor features(const UNetInputs& inputs) { return backbone->encode(inputs); }
  // Conditional logits from d(x_t', t', c) and d(x_t, t, c).
  torch::Tensor conditional(const torch::Tensor& features_prev, const torch::Tensor& features_t);
  // Unconditional logits from d(x_t', t', c).
  torch::Tensor unconditional(const torch::Tensor& features_prev);

  UNet2DConditionModel backbone{nullptr};
  DiscriminatorHead conditional_head{nullptr}, unconditional_head{nullptr};
};
TORCH_MODULE(Discriminator);

}  // namespace lightning::models
