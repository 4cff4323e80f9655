// The UNet's blocks, as diffusers.models.unets.unet_2d_blocks: CrossAttnDownBlock2D and
// DownBlock2D (one class: DownBlock, attentions optional), UNetMidBlock2DCrossAttn, and
// CrossAttnUpBlock2D / UpBlock2D (UpBlock). Submodule names equal diffusers'.
#pragma once

#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>

#include "nn/resnet.h"
#include "nn/sampling.h"
#include "nn/transformer.h"

namespace lightning::models {

struct UNetBlockOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t prev_output_channels = 0;  // up blocks: channels coming from the block below
  int64_t temb_channels = 0;
  int64_t num_layers = 1;
  bool has_attention = false;
  std::vector<int64_t> transformer_layers;  // per layer, when has_attention
  int64_t num_heads = 1;
  int64_t cross_attention_dim = 0;
  bool use_linear_projection = false;
  bool only_cross_attention = false;
  bool upcast_attention = false;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  double dropout = 0;
  double output_scale_factor = 1.0;  // mid block only (mid_block_scale_factor)
  bool add_sampler = false;          // downsampler / upsampler at the end
  int64_t downsample_padding = 1;
};

// Resnets (each optionally followed by a Transformer2DModel), then an optional Downsample2D.
// forward returns the output and the skip states (one per layer, plus the downsampled one).
class DownBlockImpl : public torch::nn::Cloneable<DownBlockImpl> {
 public:
  explicit DownBlockImpl(const UNetBlockOptions& options);
  void reset() override;
  std::pair<torch::Tensor, std::vector<torch::Tensor>> forward(const torch::Tensor& x,
                                                               const torch::Tensor& temb,
                                                               const torch::Tensor& context);

  UNetBlockOptions options;
  std::vector<nn::ResnetBlock2D> resnet_list;
  std::vector<nn::Transformer2DModel> attention_list;
  nn::Downsample2D downsampler{nullptr};
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr}, downsamplers{nullptr};
};
TORCH_MODULE(DownBlock);

// resnets.0, then (attentions.i, resnets.i+1) for each layer.
class MidBlockImpl : public torch::nn::Cloneable<MidBlockImpl> {
 public:
  explicit MidBlockImpl(const UNetBlockOptions& options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb,
                        const torch::Tensor& context);

  UNetBlockOptions options;
  std::vector<nn::ResnetBlock2D> resnet_list;
  std::vector<nn::Transformer2DModel> attention_list;
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};
};
TORCH_MODULE(MidBlock);

// For each layer: concat [x, skip] on channels, resnet, optional transformer; then an optional
// Upsample2D (to `upsample_size` when the input size is not a multiple of the total factor).
class UpBlockImpl : public torch::nn::Cloneable<UpBlockImpl> {
 public:
  explicit UpBlockImpl(const UNetBlockOptions& options);
  void reset() override;
  // skips: this block's skip states, consumed from the back.
  torch::Tensor forward(const torch::Tensor& x, std::vector<torch::Tensor> skips,
                        const torch::Tensor& temb, const torch::Tensor& context,
                        c10::optional<std::vector<int64_t>> upsample_size);

  UNetBlockOptions options;
  std::vector<nn::ResnetBlock2D> resnet_list;
  std::vector<nn::Transformer2DModel> attention_list;
  nn::Upsample2D upsampler{nullptr};
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr}, upsamplers{nullptr};
};
TORCH_MODULE(UpBlock);

}  // namespace lightning::models
