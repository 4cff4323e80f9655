// UNet2DConditionModel as diffusers.models.unets.unet_2d_condition (v0.27.2), for the
// configurations of unet_config.h: SD1.x, SDXL (addition_embed_type "text_time") and tiny ones.
#pragma once

#include <vector>

#include <optional>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>

#include "models/unet_blocks.h"
#include "models/unet_config.h"
#include "nn/checkpoint.h"
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
  // With `encoder_only` the up blocks, conv_norm_out and conv_out are not built: the backbone of
  // the distillation discriminator (METHOD.md §3), which only calls encode().
  explicit UNet2DConditionModelImpl(const UNetConfig& config, bool encoder_only = false);
  void reset() override;
  // A deep copy (see nn::copy_tensors for why Cloneable's is not used). No LoRA adapters.
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device = c10::nullopt) const override;

  // Returns the model output [B, out_channels, H, W]. Throws Error naming the input whose
  // shape does not fit the config.
  torch::Tensor forward(const UNetInputs& inputs);

  // The encoder half: time (and added) embeddings, conv_in, the down blocks and the mid block.
  // Returns the mid block's output [B, C_last, H / 2^(blocks-1), W / 2^(blocks-1)] (the last
  // down block's output when the config has no mid block). ControlNet residuals are not taken.
  torch::Tensor encode(const UNetInputs& inputs);

  // Checks inputs against the config (names, ranks, channel counts, batch sizes).
  void check_inputs(const UNetInputs& inputs) const;
  // Number of skip states, i.e. of ControlNet down residuals.
  size_t num_skip_states() const;
  // Channels of each skip state, in order (for ControlNet residual shapes).
  std::vector<int64_t> skip_channels() const;

  // The dtype forward computes in (inputs are converted to it); unset: the weights' dtype. Set
  // by the loaders (models::ModelLoadOptions::weights_dtype keeps weights narrower).
  std::optional<torch::ScalarType> compute_dtype;
  torch::ScalarType dtype() const { return compute_dtype.value_or(conv_in->weight.scalar_type()); }

  // Gradient checkpointing of the down, mid and up blocks (nn/checkpoint.h): their activations
  // are recomputed in the backward pass. Training only; no effect under NoGradGuard.
  bool gradient_checkpointing = false;

  UNetConfig config;
  bool encoder_only = false;
  nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  nn::TimestepEmbedding time_embedding{nullptr}, add_embedding{nullptr};
  std::vector<DownBlock> down_list;
  std::vector<UpBlock> up_list;
  MidBlock mid_block{nullptr};
  nn::GroupNorm conv_norm_out{nullptr};
  torch::nn::ModuleList down_blocks{nullptr}, up_blocks{nullptr};

  struct Encoded {
    torch::Tensor sample, emb, context;
    std::vector<torch::Tensor> skips;
  };
  // Everything up to the down blocks' output (skips included), before residuals and mid block.
  // `added_after_conv_in` (a ControlNet's conditioning embedding, [B, C0, H, W]) is added to
  // conv_in's output before the down blocks when given.
  Encoded run_down(const UNetInputs& inputs, const torch::Tensor& added_after_conv_in = {});
  // One block's call, checkpointed when gradient_checkpointing is set.
  std::vector<torch::Tensor> run_block(const nn::CheckpointedFn& fn,
                                       const std::vector<torch::Tensor>& inputs);
  torch::Tensor run_mid(const torch::Tensor& sample, const torch::Tensor& emb,
                        const torch::Tensor& context);
};
TORCH_MODULE(UNet2DConditionModel);

}  // namespace lightning::models
