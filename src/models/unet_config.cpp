#include "models/unet_config.h"

#include <algorithm>

#include "core/error.h"
#include "io/json_config.h"

namespace lightning::models {
namespace {

const char* const kCrossAttnDown = "CrossAttnDownBlock2D";
const char* const kDown = "DownBlock2D";
const char* const kCrossAttnUp = "CrossAttnUpBlock2D";
const char* const kUp = "UpBlock2D";
const char* const kMidCrossAttn = "UNetMidBlock2DCrossAttn";

// One entry of transformer_layers_per_block: an int (same for every layer of the block) or a
// list with one count per layer.
std::vector<int64_t> expand_layers(io::ConfigReader& reader, const std::string& key,
                                   const nlohmann::json& entry, int64_t num_layers) {
  if (entry.is_number_integer()) return std::vector<int64_t>(num_layers, entry.get<int64_t>());
  if (entry.is_array()) {
    std::vector<int64_t> out;
    for (const auto& v : entry) {
      if (!v.is_number_integer()) reader.fail_key(key, "expected integers, got " + entry.dump());
      out.push_back(v.get<int64_t>());
    }
    if (static_cast<int64_t>(out.size()) != num_layers)
      reader.fail_key(key, fmt::format("entry {} has {} counts for a block of {} layers",
                                       entry.dump(), out.size(), num_layers));
    return out;
  }
  reader.fail_key(key, "expected an integer or a list, got " + entry.dump());
}

nlohmann::json layers_json(const std::vector<std::vector<int64_t>>& per_block) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& block : per_block) {
    const bool uniform = !block.empty() && std::all_of(block.begin(), block.end(),
                                                       [&](int64_t v) { return v == block[0]; });
    out.push_back(uniform ? nlohmann::json(block[0]) : nlohmann::json(block));
  }
  return out;
}

}  // namespace

std::vector<int64_t> UNetConfig::mid_transformer_layers() const {
  return transformer_layers_per_block.back().empty()
             ? std::vector<int64_t>{1}
             : std::vector<int64_t>{transformer_layers_per_block.back().front()};
}

UNetConfig UNetConfig::from_json(const nlohmann::json& json, const std::string& file) {
  io::ConfigReader r(json, file);
  UNetConfig c;
  const auto class_name = json.value("_class_name", std::string("UNet2DConditionModel"));
  if (class_name != "UNet2DConditionModel")
    fail("{}: _class_name '{}' is not UNet2DConditionModel", file, class_name);

  c.in_channels = r.get_int("in_channels", 4);
  c.out_channels = r.get_int("out_channels", 4);
  c.center_input_sample = r.get_bool("center_input_sample", false);
  c.flip_sin_to_cos = r.get_bool("flip_sin_to_cos", true);
  c.freq_shift = r.get_double("freq_shift", 0);
  c.down_block_types = r.require_string_list("down_block_types");
  c.up_block_types = r.require_string_list("up_block_types");
  c.mid_block_type = r.get_string("mid_block_type", kMidCrossAttn);
  if (r.has("mid_block_type") && r.is_null("mid_block_type")) c.mid_block_type = "";
  c.block_out_channels = r.require_int_list("block_out_channels");
  const size_t n = c.block_out_channels.size();
  if (n == 0) r.fail_key("block_out_channels", "must not be empty");
  if (c.down_block_types.size() != n)
    r.fail_key("down_block_types", fmt::format("has {} entries but block_out_channels has {}",
                                               c.down_block_types.size(), n));
  if (c.up_block_types.size() != n)
    r.fail_key("up_block_types", fmt::format("has {} entries but block_out_channels has {}",
                                             c.up_block_types.size(), n));
  for (const auto& t : c.down_block_types)
    if (t != kCrossAttnDown && t != kDown)
      r.fail_key("down_block_types",
                 fmt::format("block type '{}' is not supported (supported: {}, {})", t,
                             kCrossAttnDown, kDown));
  for (const auto& t : c.up_block_types)
    if (t != kCrossAttnUp && t != kUp)
      r.fail_key("up_block_types",
                 fmt::format("block type '{}' is not supported (supported: {}, {})", t,
                             kCrossAttnUp, kUp));
  if (!c.mid_block_type.empty() && c.mid_block_type != kMidCrossAttn)
    r.fail_key("mid_block_type", fmt::format("'{}' is not supported (supported: {}, null)",
                                             c.mid_block_type, kMidCrossAttn));

  // only_cross_attention: bool or one bool per block.
  const auto oca = r.get_raw("only_cross_attention");
  if (oca.is_null() || oca.is_boolean()) {
    c.only_cross_attention.assign(n, oca.is_boolean() && oca.get<bool>());
  } else if (oca.is_array() && oca.size() == n) {
    for (const auto& v : oca) {
      if (!v.is_boolean())
        r.fail_key("only_cross_attention", "expected booleans, got " + oca.dump());
      c.only_cross_attention.push_back(v.get<bool>());
    }
  } else {
    r.fail_key("only_cross_attention", "expected a boolean or one per block, got " + oca.dump());
  }
  // diffusers only applies only_cross_attention to the mid block of the "simple" variant.
  r.get_raw("mid_block_only_cross_attention");

  c.layers_per_block = r.get_int_or_list("layers_per_block", 2, n);
  c.downsample_padding = r.get_int("downsample_padding", 1);
  c.mid_block_scale_factor = r.get_double("mid_block_scale_factor", 1);
  c.dropout = r.get_double("dropout", 0);
  c.norm_num_groups = r.get_int("norm_num_groups", 32);
  c.norm_eps = r.get_double("norm_eps", 1e-5);
  c.cross_attention_dim = r.get_int_or_list("cross_attention_dim", 1280, n);

  const auto tlpb = r.get_raw("transformer_layers_per_block");
  c.transformer_layers_per_block.clear();
  for (size_t i = 0; i < n; ++i) {
    nlohmann::json entry = tlpb.is_null() ? nlohmann::json(1) : tlpb;
    if (tlpb.is_array()) {
      if (tlpb.size() != n)
        r.fail_key("transformer_layers_per_block",
                   fmt::format("expected {} entries (one per block), got {}", n, tlpb.size()));
      entry = tlpb[i];
    }
    c.transformer_layers_per_block.push_back(
        expand_layers(r, "transformer_layers_per_block", entry, c.layers_per_block[i]));
  }
  const auto reverse = r.get_raw("reverse_transformer_layers_per_block");
  for (size_t i = 0; i < n; ++i) {
    const size_t down = n - 1 - i;
    const int64_t up_layers = c.layers_per_block[down] + 1;
    if (!reverse.is_null()) {
      if (!reverse.is_array() || reverse.size() != n)
        r.fail_key(
            "reverse_transformer_layers_per_block",
            fmt::format("expected {} entries (one per up block), got {}", n, reverse.dump()));
      c.reverse_transformer_layers_per_block.push_back(
          expand_layers(r, "reverse_transformer_layers_per_block", reverse[i], up_layers));
    } else {
      const auto& d = c.transformer_layers_per_block[down];
      const bool uniform = std::all_of(d.begin(), d.end(), [&](int64_t v) { return v == d[0]; });
      if (!uniform)
        r.fail_key(
            "reverse_transformer_layers_per_block",
            "required when transformer_layers_per_block varies within a block (as diffusers)");
      c.reverse_transformer_layers_per_block.push_back(std::vector<int64_t>(up_layers, d[0]));
    }
  }

  if (!r.get_raw("num_attention_heads").is_null())
    r.fail_key(
        "num_attention_heads",
        "is not supported (diffusers refuses it too; the head count is 'attention_head_dim')");
  c.num_heads = r.get_int_or_list("attention_head_dim", 8, n);
  c.use_linear_projection = r.get_bool("use_linear_projection", false);
  c.upcast_attention = r.get_bool("upcast_attention", false);
  c.addition_embed_type = r.get_string("addition_embed_type", "");
  if (!c.addition_embed_type.empty() && c.addition_embed_type != "text_time")
    r.fail_key(
        "addition_embed_type",
        fmt::format("'{}' is not supported (supported: text_time, null)", c.addition_embed_type));
  c.addition_time_embed_dim = r.get_int("addition_time_embed_dim", 0);
  c.projection_class_embeddings_input_dim = r.get_int("projection_class_embeddings_input_dim", 0);
  r.get_raw("addition_embed_type_num_heads");  // used only by addition_embed_type "text"
  c.time_embedding_dim = r.get_int("time_embedding_dim", 0);
  c.conv_in_kernel = r.get_int("conv_in_kernel", 3);
  c.conv_out_kernel = r.get_int("conv_out_kernel", 3);
  c.sample_size = r.get_int("sample_size", 0);
  // diffusers passes resnet_out_scale_factor only to block types we do not implement.
  r.get_double("resnet_out_scale_factor", 1.0);

  // Options for architectures we do not implement: only their neutral values are accepted.
  r.expect("act_fn", "silu");
  r.expect("time_embedding_type", "positional");
  r.expect("resnet_time_scale_shift", "default");
  r.expect("resnet_skip_time_act", false);
  r.expect("dual_cross_attention", false);
  r.expect("class_embeddings_concat", false);
  r.expect("attention_type", "default");
  for (const char* key : {"class_embed_type", "num_class_embeds", "encoder_hid_dim",
                          "encoder_hid_dim_type", "time_embedding_act_fn", "timestep_post_act",
                          "time_cond_proj_dim", "cross_attention_norm"}) {
    if (!r.is_null(key))
      r.fail_key(key,
                 fmt::format("value {} is not supported (supported: null)", r.get_raw(key).dump()));
    r.get_raw(key);
  }
  r.refuse_unknown_keys();
  c.validate(file);
  return c;
}

void UNetConfig::validate(const std::string& file) const {
  const size_t n = block_out_channels.size();
  auto bad = [&](const std::string& key, const std::string& msg) {
    fail("{}: key '{}': {}", file, key, msg);
  };
  for (size_t i = 0; i < n; ++i) {
    if (block_out_channels[i] <= 0 || block_out_channels[i] % norm_num_groups != 0)
      bad("block_out_channels", fmt::format("{} is not a positive multiple of norm_num_groups {}",
                                            block_out_channels[i], norm_num_groups));
    if (layers_per_block[i] <= 0) bad("layers_per_block", "must be positive");
    const bool attn =
        down_block_types[i] == kCrossAttnDown || up_block_types[n - 1 - i] == kCrossAttnUp;
    if (attn && (num_heads[i] <= 0 || block_out_channels[i] % num_heads[i] != 0))
      bad("attention_head_dim", fmt::format("{} heads do not divide {} channels of block {}",
                                            num_heads[i], block_out_channels[i], i));
    if (attn && cross_attention_dim[i] <= 0) bad("cross_attention_dim", "must be positive");
  }
  if (!mid_block_type.empty() && block_out_channels.back() % num_heads.back() != 0)
    bad("attention_head_dim", "the last head count does not divide the mid block's channels");
  if (addition_embed_type == "text_time") {
    if (addition_time_embed_dim <= 0)
      bad("addition_time_embed_dim", "required for addition_embed_type text_time");
    if (projection_class_embeddings_input_dim <= 0)
      bad("projection_class_embeddings_input_dim", "required for addition_embed_type text_time");
  }
  if (conv_in_kernel % 2 == 0 || conv_in_kernel <= 0) bad("conv_in_kernel", "must be odd");
  if (conv_out_kernel % 2 == 0 || conv_out_kernel <= 0) bad("conv_out_kernel", "must be odd");
  if (in_channels <= 0 || out_channels <= 0) bad("in_channels", "channels must be positive");
}

nlohmann::json UNetConfig::to_json() const {
  nlohmann::json j;
  j["_class_name"] = "UNet2DConditionModel";
  j["_diffusers_version"] = "0.27.2";
  j["act_fn"] = "silu";
  j["addition_embed_type"] =
      addition_embed_type.empty() ? nlohmann::json() : nlohmann::json(addition_embed_type);
  j["addition_time_embed_dim"] =
      addition_time_embed_dim > 0 ? nlohmann::json(addition_time_embed_dim) : nlohmann::json();
  j["attention_head_dim"] = num_heads;
  j["block_out_channels"] = block_out_channels;
  j["center_input_sample"] = center_input_sample;
  j["conv_in_kernel"] = conv_in_kernel;
  j["conv_out_kernel"] = conv_out_kernel;
  j["cross_attention_dim"] = cross_attention_dim;
  j["down_block_types"] = down_block_types;
  j["downsample_padding"] = downsample_padding;
  j["dropout"] = dropout;
  j["flip_sin_to_cos"] = flip_sin_to_cos;
  j["freq_shift"] = freq_shift;
  j["in_channels"] = in_channels;
  j["layers_per_block"] = layers_per_block;
  j["mid_block_scale_factor"] = mid_block_scale_factor;
  j["mid_block_type"] = mid_block_type.empty() ? nlohmann::json() : nlohmann::json(mid_block_type);
  j["norm_eps"] = norm_eps;
  j["norm_num_groups"] = norm_num_groups;
  j["only_cross_attention"] = only_cross_attention;
  j["out_channels"] = out_channels;
  j["projection_class_embeddings_input_dim"] =
      projection_class_embeddings_input_dim > 0
          ? nlohmann::json(projection_class_embeddings_input_dim)
          : nlohmann::json();
  j["reverse_transformer_layers_per_block"] = reverse_transformer_layers_per_block;
  j["sample_size"] = sample_size > 0 ? nlohmann::json(sample_size) : nlohmann::json();
  j["time_embedding_dim"] =
      time_embedding_dim > 0 ? nlohmann::json(time_embedding_dim) : nlohmann::json();
  j["transformer_layers_per_block"] = layers_json(transformer_layers_per_block);
  j["up_block_types"] = up_block_types;
  j["upcast_attention"] = upcast_attention;
  j["use_linear_projection"] = use_linear_projection;
  return j;
}

namespace {
UNetConfig base(std::vector<int64_t> channels, std::vector<std::string> down,
                std::vector<std::string> up, std::vector<int64_t> heads,
                std::vector<int64_t> transformer_layers, int64_t layers, int64_t cross_dim) {
  UNetConfig c;
  const size_t n = channels.size();
  c.block_out_channels = std::move(channels);
  c.down_block_types = std::move(down);
  c.up_block_types = std::move(up);
  c.num_heads = std::move(heads);
  c.layers_per_block.assign(n, layers);
  c.cross_attention_dim.assign(n, cross_dim);
  c.only_cross_attention.assign(n, false);
  for (size_t i = 0; i < n; ++i)
    c.transformer_layers_per_block.push_back(std::vector<int64_t>(layers, transformer_layers[i]));
  for (size_t i = 0; i < n; ++i)
    c.reverse_transformer_layers_per_block.push_back(
        std::vector<int64_t>(layers + 1, transformer_layers[n - 1 - i]));
  return c;
}
}  // namespace

UNetConfig UNetConfig::sdxl() {
  // stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
  auto c = base({320, 640, 1280}, {kDown, kCrossAttnDown, kCrossAttnDown},
                {kCrossAttnUp, kCrossAttnUp, kUp}, {5, 10, 20}, {1, 2, 10}, 2, 2048);
  c.use_linear_projection = true;
  c.addition_embed_type = "text_time";
  c.addition_time_embed_dim = 256;
  c.projection_class_embeddings_input_dim = 2816;  // 1280 pooled text + 6 time ids x 256
  c.sample_size = 128;
  return c;
}

UNetConfig UNetConfig::sd15() {
  // runwayml/stable-diffusion-v1-5 unet/config.json
  auto c =
      base({320, 640, 1280, 1280}, {kCrossAttnDown, kCrossAttnDown, kCrossAttnDown, kDown},
           {kUp, kCrossAttnUp, kCrossAttnUp, kCrossAttnUp}, {8, 8, 8, 8}, {1, 1, 1, 1}, 2, 768);
  c.sample_size = 64;
  return c;
}

UNetConfig UNetConfig::tiny_sdxl() {
  // SDXL's structure (text_time conditioning, linear projections, 2 transformer layers in the
  // deepest block) at a size that runs in milliseconds.
  auto c = base({32, 64}, {kDown, kCrossAttnDown}, {kCrossAttnUp, kUp}, {2, 4}, {1, 2}, 2, 32);
  c.use_linear_projection = true;
  c.norm_num_groups = 8;
  c.addition_embed_type = "text_time";
  c.addition_time_embed_dim = 8;
  c.projection_class_embeddings_input_dim = 16 + 6 * 8;  // pooled text 16 + 6 time ids x 8
  c.sample_size = 16;
  return c;
}

UNetConfig UNetConfig::tiny_sd15() {
  auto c = base({32, 64}, {kCrossAttnDown, kDown}, {kUp, kCrossAttnUp}, {2, 2}, {1, 1}, 1, 24);
  c.norm_num_groups = 8;
  c.sample_size = 16;
  return c;
}

UNetConfig UNetConfig::preset(const std::string& name) {
  if (name == "sdxl") return sdxl();
  if (name == "sd15") return sd15();
  if (name == "tiny-sdxl") return tiny_sdxl();
  if (name == "tiny-sd15") return tiny_sd15();
  fail_usage("unknown UNet preset '{}' (known: sdxl, sd15, tiny-sdxl, tiny-sd15)", name);
}

}  // namespace lightning::models
