// UNet2DConditionModel configuration: the fields of a diffusers unet/config.json that this
// implementation supports, with diffusers' defaults. Values diffusers would use for an
// architecture we do not implement are refused by name when the config is read.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace lightning::models {

struct UNetConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  bool center_input_sample = false;           // sample -> 2 * sample - 1
  bool flip_sin_to_cos = true;                // timestep embedding order [cos, sin]
  double freq_shift = 0;                      // downscale_freq_shift of the timestep embedding
  std::vector<std::string> down_block_types;  // CrossAttnDownBlock2D | DownBlock2D
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";  // or "" (no mid block)
  std::vector<std::string> up_block_types;                 // CrossAttnUpBlock2D | UpBlock2D
  std::vector<bool> only_cross_attention;                  // per down block
  std::vector<int64_t> block_out_channels;                 // SDXL: 320, 640, 1280
  std::vector<int64_t> layers_per_block;  // per down block (up blocks get one more)
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1;  // output_scale_factor of the mid block's resnets
  double dropout = 0;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  std::vector<int64_t> cross_attention_dim;  // per down block; SD1.x 768, SDXL 2048
  // Transformer layers per down block and per resnet/attention pair (SDXL: 1, 2, 10 -> [[], [2,2],
  // [10,10]] with the first block having no attention).
  std::vector<std::vector<int64_t>> transformer_layers_per_block;
  // Per up block and per layer; defaults to transformer_layers_per_block reversed.
  std::vector<std::vector<int64_t>> reverse_transformer_layers_per_block;
  // diffusers' "attention_head_dim" is, for this model, the number of heads per block
  // (SD1.x: 8 everywhere; SDXL: 5, 10, 20 with head_dim 64). See DESIGN.md.
  std::vector<int64_t> num_heads;
  bool use_linear_projection = false;
  bool upcast_attention = false;
  std::string addition_embed_type;                    // "" or "text_time" (SDXL)
  int64_t addition_time_embed_dim = 0;                // SDXL: 256 per time id
  int64_t projection_class_embeddings_input_dim = 0;  // SDXL: 1280 + 6 * 256 = 2816
  int64_t time_embedding_dim = 0;                     // 0: block_out_channels[0] * 4
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;
  int64_t sample_size = 0;  // informational (latent size the model was trained at)

  int64_t time_embed_dim() const {
    return time_embedding_dim > 0 ? time_embedding_dim : block_out_channels.at(0) * 4;
  }
  size_t num_blocks() const { return block_out_channels.size(); }
  // Transformer layers of the mid block (diffusers: transformer_layers_per_block[-1]).
  std::vector<int64_t> mid_transformer_layers() const;

  // Reads a diffusers config.json object; `file` names it in errors. Refuses unknown keys and
  // values for architectures not implemented here.
  static UNetConfig from_json(const nlohmann::json& json, const std::string& file);
  // The diffusers config.json for this configuration (round-trips through from_json).
  nlohmann::json to_json() const;
  // Checks internal consistency (list lengths, divisibility); throws naming the field.
  void validate(const std::string& file) const;

  // Presets (DESIGN.md): SDXL base 1.0, SD 1.5, and tiny SDXL/SD1.x-shaped configs for tests.
  static UNetConfig sdxl();
  static UNetConfig sd15();
  static UNetConfig tiny_sdxl();
  static UNetConfig tiny_sd15();
  // Looks up a preset by name ("sdxl", "sd15", "tiny-sdxl", "tiny-sd15"); throws on others.
  static UNetConfig preset(const std::string& name);
};

}  // namespace lightning::models
