// UNet2DConditionModel as diffusers.models.unets.unet_2d_condition (v0.27.2), for the
// configurations of unet_config.h: SD1.x, SDXL (addition_embed_type "text_time") and tiny ones.
#pragma once

#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>

#include "models/unet_blocks.h"
#include "models/unet_config.h"
#include "nn/embeddings.h"
#include "nn/layers.h"

namespace lightning::models {

// Inputs with diffusers' names (the `forward unet` contract of DESIGN.md).
struct UNetInputs {
  torch::Tensor sample;                 // [B, in_channels, H, W]
  torch::Tensor timestep;               // [] or [B], any numeric dtype
  torch::Tensor encoder_hidden_states;  // [B, M, cross_attention_dim]
  torch::Tensor text_embeds;            // [B, pooled dim]     (text_time only)
  torch::Tensor time_ids;               // [B, 6]              (text_time only)
  // ControlNet residuals: added to each skip state (down_block_additional_residuals) and to the
  // mid block's output (mid_block_additional_residual). Empty / undefined when unused.
  std::vector<torch::Tensor> down_residuals;
  torch::Tensor mid_residual;
};

class UNet2DConditionModelImpl : public torch::nn::Cloneable<UNet2DConditionModelImpl> {
 public:
  explicit UNet2DConditionModelImpl(const UNetConfig& config);
  void reset() override;

  // Returns the model output [B, out_channels, H, W]. Throws Error naming the input whose
  // shape does not fit the config.
  torch::Tensor forward(const UNetInputs& inputs);

  // Checks inputs against the config (names, ranks, channel counts, batch sizes).
  void check_inputs(const UNetInputs& inputs) const;
  // Number of skip states, i.e. of ControlNet down residuals.
  size_t num_skip_states() const;
  // Channels of each skip state, in order (for ControlNet residual shapes).
  std::vector<int64_t> skip_channels() const;

  UNetConfig config;
  nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  nn::TimestepEmbedding time_embedding{nullptr}, add_embedding{nullptr};
  std::vector<DownBlock> down_list;
  std::vector<UpBlock> up_list;
  MidBlock mid_block{nullptr};
  nn::GroupNorm conv_norm_out{nullptr};
  torch::nn::ModuleList down_blocks{nullptr}, up_blocks{nullptr};
};
TORCH_MODULE(UNet2DConditionModel);

}  // namespace lightning::models
