#include "models/controlnet.h"

#include <torch/torch.h>

#include "core/error.h"
#include "io/json_config.h"

namespace lightning::models {
namespace {

std::string shape_of(const torch::Tensor& t) {
  return fmt::format("[{}]", fmt::join(t.sizes(), ", "));
}

}  // namespace

ControlNetConfig ControlNetConfig::from_json(const nlohmann::json& json, const std::string& file) {
  if (!json.is_object()) fail("{}: expected a JSON object", file);
  const auto class_name = json.value("_class_name", std::string("ControlNetModel"));
  if (class_name != "ControlNetModel")
    fail("{}: _class_name '{}' is not ControlNetModel", file, class_name);
  // The ControlNet's own keys are read here; the rest is a UNet config (without up blocks).
  nlohmann::json rest = json;
  ControlNetConfig c;
  io::ConfigReader r(json, file);
  c.conditioning_channels = r.get_int("conditioning_channels", 3);
  if (r.has("conditioning_embedding_out_channels"))
    c.conditioning_embedding_out_channels =
        r.require_int_list("conditioning_embedding_out_channels");
  if (c.conditioning_embedding_out_channels.empty())
    r.fail_key("conditioning_embedding_out_channels", "must not be empty");
  for (auto v : c.conditioning_embedding_out_channels)
    if (v <= 0) r.fail_key("conditioning_embedding_out_channels", "channels must be positive");
  if (c.conditioning_channels <= 0) r.fail_key("conditioning_channels", "must be positive");
  const auto order = r.get_string("controlnet_conditioning_channel_order", "rgb");
  if (order != "rgb" && order != "bgr")
    r.fail_key("controlnet_conditioning_channel_order",
               fmt::format("'{}' is not rgb or bgr", order));
  c.bgr = order == "bgr";
  c.global_pool_conditions = r.get_bool("global_pool_conditions", false);
  for (const char* key : {"conditioning_channels", "conditioning_embedding_out_channels",
                          "controlnet_conditioning_channel_order", "global_pool_conditions"})
    rest.erase(key);
  rest["_class_name"] = "UNet2DConditionModel";
  if (!rest.contains("up_block_types") && rest.contains("down_block_types") &&
      rest["down_block_types"].is_array()) {
    nlohmann::json up = nlohmann::json::array();
    for (auto it = rest["down_block_types"].rbegin(); it != rest["down_block_types"].rend(); ++it)
      up.push_back(it->is_string() && it->get<std::string>() == "CrossAttnDownBlock2D"
                       ? "CrossAttnUpBlock2D"
                       : "UpBlock2D");
    rest["up_block_types"] = up;
  }
  c.unet = UNetConfig::from_json(rest, file);
  return c;
}

ControlNetConditioningEmbeddingImpl::ControlNetConditioningEmbeddingImpl(
    int64_t conditioning_channels, const std::vector<int64_t>& channels, int64_t out_channels) {
  conv_in = register_module("conv_in", nn::Conv2d(conditioning_channels, channels[0], 3, 1, 1));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (size_t i = 0; i + 1 < channels.size(); ++i) {
    block_list.push_back(nn::Conv2d(channels[i], channels[i], 3, 1, 1));
    block_list.push_back(nn::Conv2d(channels[i], channels[i + 1], 3, 2, 1));
  }
  for (auto& block : block_list)
    blocks->push_back(block);
  conv_out = register_module("conv_out", nn::Conv2d(channels.back(), out_channels, 3, 1, 1));
}

torch::Tensor ControlNetConditioningEmbeddingImpl::forward(const torch::Tensor& image) {
  auto h = torch::silu(conv_in(image));
  for (auto& block : block_list)
    h = torch::silu(block(h));
  return conv_out(h);
}

ControlNetModelImpl::ControlNetModelImpl(const ControlNetConfig& config_) : config(config_) {
  encoder = UNet2DConditionModel(config.unet, /*encoder_only=*/true);
  for (const auto& child : encoder->named_children())
    register_module(child.key(), child.value());
  controlnet_cond_embedding =
      register_module("controlnet_cond_embedding",
                      ControlNetConditioningEmbedding(config.conditioning_channels,
                                                      config.conditioning_embedding_out_channels,
                                                      config.unet.block_out_channels[0]));
  controlnet_down_blocks = register_module("controlnet_down_blocks", torch::nn::ModuleList());
  for (const auto channels : encoder->skip_channels()) {
    down_list.push_back(nn::Conv2d(channels, channels, 1, 1, 0));
    controlnet_down_blocks->push_back(down_list.back());
  }
  const int64_t mid = config.unet.block_out_channels.back();
  controlnet_mid_block = register_module("controlnet_mid_block", nn::Conv2d(mid, mid, 1, 1, 0));
}

ControlNetOutput ControlNetModelImpl::forward(const UNetInputs& inputs, const torch::Tensor& image,
                                              double scale) {
  const int64_t f = config.downscale();
  const auto& s = inputs.sample;
  if (image.dim() != 4 || image.size(1) != config.conditioning_channels ||
      (s.defined() && s.dim() == 4 &&
       (image.size(0) != s.size(0) || image.size(2) != s.size(2) * f ||
        image.size(3) != s.size(3) * f)))
    fail("input 'controlnet_cond': expected [B, {}, H * {}, W * {}] for a sample {}, got {}",
         config.conditioning_channels, f, f, s.defined() ? shape_of(s) : "[]", shape_of(image));
  auto cond = image.to(s.device(), dtype());
  if (config.bgr) cond = cond.flip({1});
  auto e = encoder->run_down(inputs, controlnet_cond_embedding(cond));
  auto mid = encoder->mid_block ? encoder->mid_block(e.sample, e.emb, e.context) : e.sample;
  ControlNetOutput out;
  for (size_t i = 0; i < down_list.size(); ++i)
    out.down.push_back(down_list[i](e.skips[i]) * scale);
  out.mid = controlnet_mid_block(mid) * scale;
  if (config.global_pool_conditions) {
    for (auto& d : out.down)
      d = d.mean({2, 3}, /*keepdim=*/true);
    out.mid = out.mid.mean({2, 3}, /*keepdim=*/true);
  }
  return out;
}

}  // namespace lightning::models
