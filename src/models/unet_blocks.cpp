#include "models/unet_blocks.h"

namespace lightning::models {
namespace {

nn::ResnetBlock2D make_resnet(const UNetBlockOptions& o, int64_t in, int64_t out) {
  return nn::ResnetBlock2D(nn::ResnetBlock2DOptions(in, out)
                               .temb_channels(o.temb_channels)
                               .groups(o.norm_num_groups)
                               .eps(o.norm_eps)
                               .dropout(o.dropout)
                               .output_scale_factor(o.output_scale_factor));
}

// diffusers: Transformer2DModel(num_heads, channels // num_heads, in_channels=channels, ...).
nn::Transformer2DModel make_transformer(const UNetBlockOptions& o, int64_t channels,
                                        int64_t layers) {
  return nn::Transformer2DModel(nn::TransformerOptions(o.num_heads, channels / o.num_heads)
                                    .in_channels(channels)
                                    .num_layers(layers)
                                    .cross_attention_dim(o.cross_attention_dim)
                                    .norm_num_groups(o.norm_num_groups)
                                    .use_linear_projection(o.use_linear_projection)
                                    .only_cross_attention(o.only_cross_attention)
                                    .upcast_attention(o.upcast_attention)
                                    .dropout(o.dropout));
}

}  // namespace

DownBlockImpl::DownBlockImpl(const UNetBlockOptions& options_) : options(options_) {
  reset();
}

void DownBlockImpl::reset() {
  resnets = register_module("resnets", torch::nn::ModuleList());
  resnet_list.clear();
  attention_list.clear();
  if (options.has_attention) attentions = register_module("attentions", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.num_layers; ++i) {
    const int64_t in = i == 0 ? options.in_channels : options.out_channels;
    resnet_list.push_back(make_resnet(options, in, options.out_channels));
    resnets->push_back(resnet_list.back());
    if (options.has_attention) {
      attention_list.push_back(
          make_transformer(options, options.out_channels, options.transformer_layers.at(i)));
      attentions->push_back(attention_list.back());
    }
  }
  if (options.add_sampler) {
    downsampler =
        nn::Downsample2D(options.out_channels, options.out_channels, options.downsample_padding);
    downsamplers = register_module("downsamplers", torch::nn::ModuleList(downsampler));
  }
}

std::pair<torch::Tensor, std::vector<torch::Tensor>> DownBlockImpl::forward(
    const torch::Tensor& x, const torch::Tensor& temb, const torch::Tensor& context) {
  std::vector<torch::Tensor> states;
  auto h = x;
  for (size_t i = 0; i < resnet_list.size(); ++i) {
    h = resnet_list[i](h, temb);
    if (options.has_attention) h = attention_list[i](h, context);
    states.push_back(h);
  }
  if (downsampler) {
    h = downsampler(h);
    states.push_back(h);
  }
  return {h, states};
}

MidBlockImpl::MidBlockImpl(const UNetBlockOptions& options_) : options(options_) {
  reset();
}

void MidBlockImpl::reset() {
  const int64_t c = options.in_channels;
  resnets = register_module("resnets", torch::nn::ModuleList());
  attentions = register_module("attentions", torch::nn::ModuleList());
  resnet_list = {make_resnet(options, c, c)};
  attention_list.clear();
  resnets->push_back(resnet_list.back());
  for (int64_t i = 0; i < options.num_layers; ++i) {
    attention_list.push_back(make_transformer(options, c, options.transformer_layers.at(i)));
    attentions->push_back(attention_list.back());
    resnet_list.push_back(make_resnet(options, c, c));
    resnets->push_back(resnet_list.back());
  }
}

torch::Tensor MidBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& temb,
                                    const torch::Tensor& context) {
  auto h = resnet_list[0](x, temb);
  for (size_t i = 0; i < attention_list.size(); ++i) {
    h = attention_list[i](h, context);
    h = resnet_list[i + 1](h, temb);
  }
  return h;
}

UpBlockImpl::UpBlockImpl(const UNetBlockOptions& options_) : options(options_) {
  reset();
}

void UpBlockImpl::reset() {
  resnets = register_module("resnets", torch::nn::ModuleList());
  resnet_list.clear();
  attention_list.clear();
  if (options.has_attention) attentions = register_module("attentions", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.num_layers; ++i) {
    // diffusers: the last layer's skip comes from the block's input level (in_channels).
    const int64_t skip = i == options.num_layers - 1 ? options.in_channels : options.out_channels;
    const int64_t in = i == 0 ? options.prev_output_channels : options.out_channels;
    resnet_list.push_back(make_resnet(options, in + skip, options.out_channels));
    resnets->push_back(resnet_list.back());
    if (options.has_attention) {
      attention_list.push_back(
          make_transformer(options, options.out_channels, options.transformer_layers.at(i)));
      attentions->push_back(attention_list.back());
    }
  }
  if (options.add_sampler) {
    upsampler = nn::Upsample2D(options.out_channels, options.out_channels);
    upsamplers = register_module("upsamplers", torch::nn::ModuleList(upsampler));
  }
}

torch::Tensor UpBlockImpl::forward(const torch::Tensor& x, std::vector<torch::Tensor> skips,
                                   const torch::Tensor& temb, const torch::Tensor& context,
                                   c10::optional<std::vector<int64_t>> upsample_size) {
  auto h = x;
  for (size_t i = 0; i < resnet_list.size(); ++i) {
    h = torch::cat({h, skips.back()}, 1);  // [hidden, skip] on channels, hidden first
    skips.pop_back();
    h = resnet_list[i](h, temb);
    if (options.has_attention) h = attention_list[i](h, context);
  }
  if (upsampler) h = upsampler(h, upsample_size);
  return h;
}

}  // namespace lightning::models
