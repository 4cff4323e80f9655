#include "models/discriminator.h"

#include <numeric>

#include <torch/nn/functional/activation.h>

#include "core/error.h"
#include "io/state_dict.h"

namespace lightning::models {

DiscriminatorHeadImpl::DiscriminatorHeadImpl(int64_t in_channels_,
                                             const DiscriminatorHeadConfig& config_)
    : in_channels(in_channels_), config(config_) {
  if (config.channels < 0)
    fail("discriminator head: channels must be >= 0, got {}", config.channels);
  if (config.blocks < 0) fail("discriminator head: blocks must be >= 0, got {}", config.blocks);
  if (config.norm_groups < 1)
    fail("discriminator head: norm_groups must be >= 1, got {}", config.norm_groups);
  reset();
}

void DiscriminatorHeadImpl::reset() {
  const int64_t width = config.channels > 0 ? config.channels : in_channels;
  int64_t groups = std::gcd(config.norm_groups, width);  // a divisor of width, <= norm_groups
  convs = register_module("convs", torch::nn::ModuleList());
  norms = register_module("norms", torch::nn::ModuleList());
  int64_t channels = in_channels;
  for (int64_t i = 0; i < config.blocks; ++i) {
    convs->push_back(nn::Conv2d(channels, width, 4, 2, 1));
    norms->push_back(nn::GroupNorm(groups, width, 1e-5));
    channels = width;
  }
  out = register_module("out", nn::Conv2d(channels, 1, 1));
}

torch::Tensor DiscriminatorHeadImpl::forward(const torch::Tensor& features) {
  auto h = features;
  for (size_t i = 0; i < convs->size(); ++i) {
    if (h.size(2) < 2 || h.size(3) < 2)
      fail(
          "discriminator head: block {} gets {}x{} features; lower [[stages]] head_blocks or "
          "use larger images",
          i, h.size(2), h.size(3));
    h = convs[i]->as<nn::Conv2dImpl>()->forward(h);
    h = torch::silu(norms[i]->as<nn::GroupNormImpl>()->forward(h));
  }
  return out(h).mean({1, 2, 3});
}

int64_t smallest_discriminator_input(const UNetConfig& unet, const DiscriminatorHeadConfig& head) {
  // Features of side f >= 2^blocks survive the head's halvings (floor) with >= 2 left for the
  // last block; an input of side n gives f = ceil(n / 2^(levels - 1)).
  const int64_t features = int64_t{1} << head.blocks;
  const int64_t down = int64_t{1} << (static_cast<int64_t>(unet.num_blocks()) - 1);
  return (features - 1) * down + 1;
}

DiscriminatorImpl::DiscriminatorImpl(const UNetConfig& unet_config,
                                     const DiscriminatorHeadConfig& head) {
  backbone = register_module("backbone", UNet2DConditionModel(unet_config, /*encoder_only=*/true));
  const int64_t channels = unet_config.block_out_channels.back();
  conditional_head = register_module("conditional_head", DiscriminatorHead(2 * channels, head));
  unconditional_head = register_module("unconditional_head", DiscriminatorHead(channels, head));
}

void DiscriminatorImpl::init_backbone_from(UNet2DConditionModel& teacher) {
  torch::NoGradGuard no_grad;
  auto source = io::module_tensors(*teacher);
  for (auto& item : backbone->named_parameters(true)) {
    auto it = source.find(item.key());
    if (it == source.end() || it->second.sizes() != item.value().sizes())
      fail("discriminator: the teacher UNet has no parameter '{}' of shape [{}]", item.key(),
           fmt::join(item.value().sizes(), ", "));
    // A fresh tensor: the teacher's may be a view of a memory-mapped file.
    item.value().set_data(it->second.detach().to(item.value().options()).clone());
  }
}

torch::Tensor DiscriminatorImpl::conditional(const torch::Tensor& features_prev,
                                             const torch::Tensor& features_t) {
  return conditional_head(torch::cat({features_prev, features_t}, 1));
}

torch::Tensor DiscriminatorImpl::unconditional(const torch::Tensor& features_prev) {
  return unconditional_head(features_prev);
}

}  // namespace lightning::models
