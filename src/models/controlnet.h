// ControlNetModel as diffusers.models.controlnet (v0.27.2): a trainable copy of a UNet's encoder
// (time and added embeddings, conv_in, down blocks, mid block) whose conv_in output also gets an
// embedding of a conditioning image (edges, depth, pose ...), and zero-initialised 1x1 convs that
// turn every skip state and the mid block's output into residuals for the UNet
// (UNetInputs::down_residuals / mid_residual). Parameter names equal diffusers'.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>
#include <nlohmann/json.hpp>

#include "models/unet.h"
#include "models/unet_config.h"
#include "nn/layers.h"

namespace lightning::models {

// A ControlNetModel config.json: the encoder's fields are a UNet's; the rest is the ControlNet's.
struct ControlNetConfig {
  UNetConfig unet;  // up_block_types etc. are derived and unused
  int64_t conditioning_channels = 3;
  std::vector<int64_t> conditioning_embedding_out_channels = {16, 32, 96, 256};
  bool bgr = false;                     // controlnet_conditioning_channel_order "bgr"
  bool global_pool_conditions = false;  // residuals averaged to 1x1 (shuffle-style ControlNets)

  // Strict like UNetConfig::from_json; errors name `file` and the key.
  static ControlNetConfig from_json(const nlohmann::json& json, const std::string& file);
  // The conditioning image is this many times the latent's size (2^(levels - 1)).
  int64_t downscale() const {
    return int64_t{1} << (conditioning_embedding_out_channels.size() - 1);
  }
};

// ControlNetConditioningEmbedding: conv_in, pairs of 3x3 convs (the second of each with stride
// 2), conv_out to the UNet's first channel count; SiLU between.
class ControlNetConditioningEmbeddingImpl : public torch::nn::Module {
 public:
  ControlNetConditioningEmbeddingImpl(int64_t conditioning_channels,
                                      const std::vector<int64_t>& channels, int64_t out_channels);
  torch::Tensor forward(const torch::Tensor& image);

  nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  std::vector<nn::Conv2d> block_list;
};
TORCH_MODULE(ControlNetConditioningEmbedding);

struct ControlNetOutput {
  std::vector<torch::Tensor> down;  // one per UNet skip state (down_block_additional_residuals)
  torch::Tensor mid;                // mid_block_additional_residual
};

class ControlNetModelImpl : public torch::nn::Module {
 public:
  explicit ControlNetModelImpl(const ControlNetConfig& config);
  // `inputs`: what the UNet gets at this step (sample, timestep, encoder_hidden_states and, for
  // SDXL, text_embeds and time_ids); `image`: the conditioning image [B, C, H * f, W * f] in
  // [0, 1] (RGB; f = config.downscale()). Residuals are multiplied by `scale`. Throws Error naming
  // 'controlnet_cond' when the image does not fit.
  ControlNetOutput forward(const UNetInputs& inputs, const torch::Tensor& image, double scale);

  void set_compute_dtype(torch::ScalarType dtype) { encoder->compute_dtype = dtype; }
  torch::ScalarType dtype() const { return encoder->dtype(); }

  ControlNetConfig config;
  // The encoder half, built encoder-only; not registered itself: its children are registered
  // here under their own names (conv_in, time_embedding, add_embedding, down_blocks, mid_block).
  UNet2DConditionModel encoder{nullptr};
  ControlNetConditioningEmbedding controlnet_cond_embedding{nullptr};
  torch::nn::ModuleList controlnet_down_blocks{nullptr};
  std::vector<nn::Conv2d> down_list;
  nn::Conv2d controlnet_mid_block{nullptr};
};
TORCH_MODULE(ControlNetModel);

}  // namespace lightning::models
