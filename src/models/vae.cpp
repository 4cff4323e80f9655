#include "models/vae.h"

#include <cmath>
#include <functional>

#include "core/error.h"
#include "io/json_config.h"
#include "nn/attention.h"

namespace lightning::models {
namespace {

const char* const kDownEncoder = "DownEncoderBlock2D";
const char* const kUpDecoder = "UpDecoderBlock2D";

nn::ResnetBlock2D make_resnet(int64_t in, int64_t out, int64_t groups) {
  // diffusers: temb_channels=None, resnet_eps=1e-6, output_scale_factor=1.
  return nn::ResnetBlock2D(
      nn::ResnetBlock2DOptions(in, out).temb_channels(0).groups(groups).eps(1e-6));
}

std::vector<double> double_list(io::ConfigReader& r, const std::string& key) {
  const auto v = r.get_raw(key);
  std::vector<double> out;
  if (v.is_null()) return out;
  if (!v.is_array()) r.fail_key(key, "expected a list of numbers or null, got " + v.dump());
  for (const auto& x : v) {
    if (!x.is_number()) r.fail_key(key, "expected numbers, got " + v.dump());
    out.push_back(x.get<double>());
  }
  return out;
}

std::string shape_str(const torch::Tensor& t) {
  return fmt::format("[{}]", fmt::join(t.sizes(), ", "));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Config

VAEConfig VAEConfig::from_json(const nlohmann::json& json, const std::string& file) {
  io::ConfigReader r(json, file);
  VAEConfig c;
  const auto class_name = json.value("_class_name", std::string("AutoencoderKL"));
  if (class_name != "AutoencoderKL")
    fail("{}: _class_name '{}' is not AutoencoderKL", file, class_name);
  c.in_channels = r.get_int("in_channels", 3);
  c.out_channels = r.get_int("out_channels", 3);
  c.latent_channels = r.get_int("latent_channels", 4);
  c.block_out_channels = r.has("block_out_channels") ? r.require_int_list("block_out_channels")
                                                     : std::vector<int64_t>{64};
  const size_t n = c.block_out_channels.size();
  if (n == 0) r.fail_key("block_out_channels", "must not be empty");
  for (const auto* key : {"down_block_types", "up_block_types"}) {
    const bool down = std::string(key) == "down_block_types";
    const std::string expected = down ? kDownEncoder : kUpDecoder;
    const auto types = r.has(key) ? r.require_string_list(key) : std::vector<std::string>{expected};
    if (types.size() != n)
      r.fail_key(key, fmt::format("has {} entries but block_out_channels has {}", types.size(), n));
    for (const auto& t : types)
      if (t != expected)
        r.fail_key(key,
                   fmt::format("block type '{}' is not supported (supported: {})", t, expected));
  }
  r.expect("act_fn", "silu");
  c.layers_per_block = r.get_int("layers_per_block", 1);
  c.norm_num_groups = r.get_int("norm_num_groups", 32);
  const auto sample_size = r.get_raw("sample_size");
  if (sample_size.is_number_integer())
    c.sample_size = sample_size.get<int64_t>();
  else if (sample_size.is_array() && !sample_size.empty() && sample_size[0].is_number_integer())
    c.sample_size = sample_size[0].get<int64_t>();
  else if (!sample_size.is_null())
    r.fail_key("sample_size", "expected an integer or a list, got " + sample_size.dump());
  c.scaling_factor = r.get_double("scaling_factor", 0.18215);
  c.shift_factor = r.get_double("shift_factor", 0);
  c.latents_mean = double_list(r, "latents_mean");
  c.latents_std = double_list(r, "latents_std");
  // diffusers declares force_upcast as a float; configs hold true/false.
  const auto upcast = r.get_raw("force_upcast");
  if (upcast.is_boolean())
    c.force_upcast = upcast.get<bool>();
  else if (upcast.is_number())
    c.force_upcast = upcast.get<double>() != 0;
  else if (!upcast.is_null())
    r.fail_key("force_upcast", "expected a boolean, got " + upcast.dump());
  c.mid_block_add_attention = r.get_bool("mid_block_add_attention", true);
  c.use_quant_conv = r.get_bool("use_quant_conv", true);
  c.use_post_quant_conv = r.get_bool("use_post_quant_conv", true);
  r.refuse_unknown_keys();
  c.validate(file);
  return c;
}

void VAEConfig::validate(const std::string& file) const {
  auto bad = [&](const std::string& key, const std::string& msg) {
    fail("{}: key '{}': {}", file, key, msg);
  };
  if (norm_num_groups <= 0) bad("norm_num_groups", "must be positive");
  for (auto ch : block_out_channels)
    if (ch <= 0 || ch % norm_num_groups != 0)
      bad("block_out_channels",
          fmt::format("{} is not a positive multiple of norm_num_groups {}", ch, norm_num_groups));
  if (layers_per_block <= 0) bad("layers_per_block", "must be positive");
  if (in_channels <= 0 || out_channels <= 0) bad("in_channels", "channels must be positive");
  if (latent_channels <= 0) bad("latent_channels", "must be positive");
  if (!(scaling_factor > 0)) bad("scaling_factor", "must be positive");
  if (latents_mean.size() != latents_std.size())
    bad("latents_std", "latents_mean and latents_std must both be given, or neither");
  if (!latents_mean.empty() && static_cast<int64_t>(latents_mean.size()) != latent_channels)
    bad("latents_mean",
        fmt::format("has {} entries for {} latent channels", latents_mean.size(), latent_channels));
}

nlohmann::json VAEConfig::to_json() const {
  nlohmann::json j;
  j["_class_name"] = "AutoencoderKL";
  j["_diffusers_version"] = "0.27.2";
  j["act_fn"] = "silu";
  j["block_out_channels"] = block_out_channels;
  j["down_block_types"] = std::vector<std::string>(block_out_channels.size(), kDownEncoder);
  j["up_block_types"] = std::vector<std::string>(block_out_channels.size(), kUpDecoder);
  j["force_upcast"] = force_upcast;
  j["in_channels"] = in_channels;
  j["out_channels"] = out_channels;
  j["latent_channels"] = latent_channels;
  j["layers_per_block"] = layers_per_block;
  j["norm_num_groups"] = norm_num_groups;
  j["sample_size"] = sample_size;
  j["scaling_factor"] = scaling_factor;
  j["latents_mean"] = latents_mean.empty() ? nlohmann::json() : nlohmann::json(latents_mean);
  j["latents_std"] = latents_std.empty() ? nlohmann::json() : nlohmann::json(latents_std);
  if (shift_factor != 0) j["shift_factor"] = shift_factor;
  if (!mid_block_add_attention) j["mid_block_add_attention"] = false;
  if (!use_quant_conv) j["use_quant_conv"] = false;
  if (!use_post_quant_conv) j["use_post_quant_conv"] = false;
  return j;
}

VAEConfig VAEConfig::sdxl() {
  VAEConfig c;
  c.block_out_channels = {128, 256, 512, 512};
  c.layers_per_block = 2;
  c.sample_size = 1024;
  c.scaling_factor = 0.13025;
  return c;
}

VAEConfig VAEConfig::tiny() {
  VAEConfig c;
  c.block_out_channels = {8, 16};
  c.norm_num_groups = 4;
  c.sample_size = 32;
  return c;
}

torch::Tensor VAEConfig::to_unet_latent(const torch::Tensor& latent) const {
  if (!latents_mean.empty()) {
    const auto opts = torch::TensorOptions().dtype(latent.scalar_type()).device(latent.device());
    auto mean = torch::tensor(latents_mean, opts).view({1, -1, 1, 1});
    auto std = torch::tensor(latents_std, opts).view({1, -1, 1, 1});
    return (latent - mean) * scaling_factor / std;
  }
  return (latent - shift_factor) * scaling_factor;
}

torch::Tensor VAEConfig::from_unet_latent(const torch::Tensor& latent) const {
  if (!latents_mean.empty()) {
    const auto opts = torch::TensorOptions().dtype(latent.scalar_type()).device(latent.device());
    auto mean = torch::tensor(latents_mean, opts).view({1, -1, 1, 1});
    auto std = torch::tensor(latents_std, opts).view({1, -1, 1, 1});
    return latent * std / scaling_factor + mean;
  }
  return latent / scaling_factor + shift_factor;
}

// ---------------------------------------------------------------------------------------------
// Modules

VAEAttentionImpl::VAEAttentionImpl(int64_t channels_, int64_t groups_)
    : channels(channels_), groups(groups_) {
  reset();
}

void VAEAttentionImpl::reset() {
  group_norm = register_module("group_norm", nn::GroupNorm(groups, channels, 1e-6));
  to_q = register_module("to_q", nn::Linear(channels, channels));
  to_k = register_module("to_k", nn::Linear(channels, channels));
  to_v = register_module("to_v", nn::Linear(channels, channels));
  out_proj = nn::Linear(channels, channels);
  to_out = register_module("to_out", torch::nn::ModuleList(out_proj));
}

torch::Tensor VAEAttentionImpl::forward(const torch::Tensor& x) {
  const auto B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto h = group_norm(x).view({B, C, H * W}).transpose(1, 2);  // [B, HW, C]
  auto q = to_q(h).unsqueeze(1), k = to_k(h).unsqueeze(1), v = to_v(h).unsqueeze(1);
  auto a = nn::scaled_dot_product_attention(q, k, v, 1.0 / std::sqrt(static_cast<double>(C)),
                                            /*upcast=*/true);
  auto out = out_proj(a.squeeze(1));  // [B, HW, C]
  return out.transpose(1, 2).reshape({B, C, H, W}) + x;
}

VAEMidBlockImpl::VAEMidBlockImpl(int64_t channels_, int64_t groups_, bool add_attention_)
    : channels(channels_), groups(groups_), add_attention(add_attention_) {
  reset();
}

void VAEMidBlockImpl::reset() {
  resnets = register_module("resnets", torch::nn::ModuleList());
  resnet_list = {make_resnet(channels, channels, groups), make_resnet(channels, channels, groups)};
  for (auto& r : resnet_list)
    resnets->push_back(r);
  if (add_attention) {
    attention = VAEAttention(channels, groups);
    attentions = register_module("attentions", torch::nn::ModuleList(attention));
  }
}

torch::Tensor VAEMidBlockImpl::forward(const torch::Tensor& x) {
  auto h = resnet_list[0](x, torch::Tensor());
  if (attention) h = attention(h);
  return resnet_list[1](h, torch::Tensor());
}

VAEBlockImpl::VAEBlockImpl(int64_t in_channels_, int64_t out_channels_, int64_t num_layers_,
                           int64_t groups_, Sampler sampler_)
    : in_channels(in_channels_),
      out_channels(out_channels_),
      num_layers(num_layers_),
      groups(groups_),
      sampler(sampler_) {
  reset();
}

void VAEBlockImpl::reset() {
  resnets = register_module("resnets", torch::nn::ModuleList());
  resnet_list.clear();
  for (int64_t i = 0; i < num_layers; ++i) {
    resnet_list.push_back(make_resnet(i == 0 ? in_channels : out_channels, out_channels, groups));
    resnets->push_back(resnet_list.back());
  }
  if (sampler == Sampler::down) {
    downsampler = nn::Downsample2D(out_channels, out_channels, /*padding=*/0);
    downsamplers = register_module("downsamplers", torch::nn::ModuleList(downsampler));
  } else if (sampler == Sampler::up) {
    upsampler = nn::Upsample2D(out_channels, out_channels);
    upsamplers = register_module("upsamplers", torch::nn::ModuleList(upsampler));
  }
}

torch::Tensor VAEBlockImpl::forward(const torch::Tensor& x) {
  auto h = x;
  for (auto& r : resnet_list)
    h = r(h, torch::Tensor());
  if (downsampler) h = downsampler(h);
  if (upsampler) h = upsampler(h);
  return h;
}

VAEEncoderImpl::VAEEncoderImpl(const VAEConfig& config_) : config(config_) {
  reset();
}

void VAEEncoderImpl::reset() {
  const auto& c = config;
  const auto& ch = c.block_out_channels;
  conv_in = register_module("conv_in", nn::Conv2d(c.in_channels, ch[0], 3, 1, 1));
  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  block_list.clear();
  int64_t out = ch[0];
  for (size_t i = 0; i < ch.size(); ++i) {
    const int64_t in = out;
    out = ch[i];
    const bool last = i + 1 == ch.size();
    block_list.push_back(
        VAEBlock(in, out, c.layers_per_block, c.norm_num_groups,
                 last ? VAEBlockImpl::Sampler::none : VAEBlockImpl::Sampler::down));
    down_blocks->push_back(block_list.back());
  }
  mid_block = register_module("mid_block",
                              VAEMidBlock(ch.back(), c.norm_num_groups, c.mid_block_add_attention));
  conv_norm_out =
      register_module("conv_norm_out", nn::GroupNorm(c.norm_num_groups, ch.back(), 1e-6));
  conv_out = register_module("conv_out", nn::Conv2d(ch.back(), 2 * c.latent_channels, 3, 1, 1));
}

torch::Tensor VAEEncoderImpl::forward(const torch::Tensor& x) {
  auto h = conv_in(x);
  for (auto& b : block_list)
    h = b(h);
  h = mid_block(h);
  return conv_out(torch::silu(conv_norm_out(h)));
}

VAEDecoderImpl::VAEDecoderImpl(const VAEConfig& config_) : config(config_) {
  reset();
}

void VAEDecoderImpl::reset() {
  const auto& c = config;
  const auto& ch = c.block_out_channels;
  conv_in = register_module("conv_in", nn::Conv2d(c.latent_channels, ch.back(), 3, 1, 1));
  mid_block = register_module("mid_block",
                              VAEMidBlock(ch.back(), c.norm_num_groups, c.mid_block_add_attention));
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  block_list.clear();
  int64_t out = ch.back();
  for (size_t i = 0; i < ch.size(); ++i) {
    const int64_t in = out;
    out = ch[ch.size() - 1 - i];
    const bool last = i + 1 == ch.size();
    block_list.push_back(VAEBlock(in, out, c.layers_per_block + 1, c.norm_num_groups,
                                  last ? VAEBlockImpl::Sampler::none : VAEBlockImpl::Sampler::up));
    up_blocks->push_back(block_list.back());
  }
  conv_norm_out = register_module("conv_norm_out", nn::GroupNorm(c.norm_num_groups, ch[0], 1e-6));
  conv_out = register_module("conv_out", nn::Conv2d(ch[0], c.out_channels, 3, 1, 1));
}

torch::Tensor VAEDecoderImpl::forward(const torch::Tensor& z) {
  auto h = mid_block(conv_in(z));
  for (auto& b : block_list)
    h = b(h);
  return conv_out(torch::silu(conv_norm_out(h)));
}

// ---------------------------------------------------------------------------------------------
// AutoencoderKL

torch::Tensor LatentDistribution::sample(c10::optional<at::Generator> generator) const {
  auto noise = torch::randn(mean.sizes(), generator, mean.options());
  return mean + torch::exp(0.5 * logvar) * noise;
}

AutoencoderKLImpl::AutoencoderKLImpl(const VAEConfig& config_) : config(config_) {
  reset();
}

void AutoencoderKLImpl::reset() {
  const int64_t l = config.latent_channels;
  encoder = register_module("encoder", VAEEncoder(config));
  decoder = register_module("decoder", VAEDecoder(config));
  if (config.use_quant_conv)
    quant_conv = register_module("quant_conv", nn::Conv2d(2 * l, 2 * l, 1));
  if (config.use_post_quant_conv)
    post_quant_conv = register_module("post_quant_conv", nn::Conv2d(l, l, 1));
}

torch::Tensor AutoencoderKLImpl::encode_moments(const torch::Tensor& image) {
  auto h = encoder(image.to(dtype()));
  return quant_conv ? quant_conv(h) : h;
}

torch::Tensor AutoencoderKLImpl::decode_latent(const torch::Tensor& latent) {
  auto z = latent.to(dtype());
  return decoder(post_quant_conv ? post_quant_conv(z) : z);
}

namespace {

LatentDistribution split_moments(const torch::Tensor& moments) {
  auto parts = moments.chunk(2, 1);
  return {parts[0], parts[1].clamp(-30.0, 20.0)};
}

void check_image(const torch::Tensor& image, const VAEConfig& c) {
  const int64_t f = c.downscale();
  if (image.dim() != 4 || image.size(1) != c.in_channels)
    fail("VAE encode: image has shape {}, expected [B, {}, H, W]", shape_str(image), c.in_channels);
  if (image.size(2) % f != 0 || image.size(3) % f != 0)
    fail("VAE encode: image size {}x{} (HxW) is not divisible by {}", image.size(2), image.size(3),
         f);
}

void check_latent(const torch::Tensor& latent, const VAEConfig& c) {
  if (latent.dim() != 4 || latent.size(1) != c.latent_channels)
    fail("VAE decode: latent has shape {}, expected [B, {}, h, w]", shape_str(latent),
         c.latent_channels);
}

// One side's blending weights for a tile of `size` output pixels: linear ramps over the overlap
// with the previous and the next tile (so two overlapping tiles' weights sum to one).
torch::Tensor ramp(int64_t size, int64_t overlap_before, int64_t overlap_after) {
  auto i = torch::arange(size, torch::kFloat32) + 0.5;
  auto w = torch::ones({size});
  if (overlap_before > 0) w = w * torch::clamp(i / overlap_before, 0.0, 1.0);
  if (overlap_after > 0) w = w * torch::clamp((size - i) / overlap_after, 0.0, 1.0);
  return w;
}

// Runs `fn` on overlapping tiles of x [B, C, H, W]. Tiles are laid out on the latent grid
// (`rows`, `cols`); x has `in_scale` pixels per grid cell and the tile outputs `out_scale`; the
// outputs are blended into one.
torch::Tensor run_tiled(const torch::Tensor& x, const TileSpan& rows, const TileSpan& cols,
                        int64_t in_scale, int64_t out_scale,
                        const std::function<torch::Tensor(const torch::Tensor&)>& fn) {
  auto weights = [&](const TileSpan& span, size_t k) {
    const auto& s = span.starts;
    const int64_t before = k > 0 ? s[k - 1] + span.size - s[k] : 0;
    const int64_t after = k + 1 < s.size() ? s[k] + span.size - s[k + 1] : 0;
    return ramp(span.size * out_scale, before * out_scale, after * out_scale);
  };
  const int64_t grid_h = x.size(2) / in_scale, grid_w = x.size(3) / in_scale;
  torch::Tensor acc, weight_sum;
  for (size_t a = 0; a < rows.starts.size(); ++a) {
    const auto wy = weights(rows, a);
    const int64_t y = rows.starts[a];
    for (size_t b = 0; b < cols.starts.size(); ++b) {
      const auto wx = weights(cols, b);
      const int64_t xx = cols.starts[b];
      auto out = fn(x.slice(2, y * in_scale, (y + rows.size) * in_scale)
                        .slice(3, xx * in_scale, (xx + cols.size) * in_scale))
                     .to(torch::kFloat32);
      if (!acc.defined()) {
        acc = torch::zeros({out.size(0), out.size(1), grid_h * out_scale, grid_w * out_scale},
                           out.options());
        weight_sum = torch::zeros({grid_h * out_scale, grid_w * out_scale}, out.options());
      }
      auto w = (wy.unsqueeze(1) * wx.unsqueeze(0)).to(out.device());
      const int64_t oy = y * out_scale, ox = xx * out_scale;
      acc.slice(2, oy, oy + out.size(2)).slice(3, ox, ox + out.size(3)).add_(out * w);
      weight_sum.slice(0, oy, oy + out.size(2)).slice(1, ox, ox + out.size(3)).add_(w);
    }
  }
  return acc / weight_sum;
}

void check_tiling(const VAETiling& t, int64_t f) {
  if (t.tile <= 0 || t.tile % f != 0)
    fail_usage("VAE tile size {} is not a positive multiple of {}", t.tile, f);
  if (t.overlap < 0 || t.overlap % f != 0 || t.overlap >= t.tile)
    fail_usage("VAE tile overlap {} must be a multiple of {} below the tile size {}", t.overlap, f,
               t.tile);
}

}  // namespace

TileSpan tile_span(int64_t length, int64_t max_tile, int64_t overlap) {
  if (length <= max_tile) return {length, {0}};
  // The fewest tiles of at most max_tile that overlap by at least `overlap`, then the smallest
  // tile size that still covers the side with them, spread evenly.
  const int64_t n = (length - overlap + (max_tile - overlap) - 1) / (max_tile - overlap);
  const int64_t size = (length + (n - 1) * overlap + n - 1) / n;
  TileSpan span{size, {}};
  for (int64_t i = 0; i < n; ++i)
    span.starts.push_back(
        static_cast<int64_t>(std::llround(static_cast<double>(i) * (length - size) / (n - 1))));
  return span;
}

LatentDistribution AutoencoderKLImpl::encode(const torch::Tensor& image) {
  check_image(image, config);
  return split_moments(encode_moments(image));
}

torch::Tensor AutoencoderKLImpl::decode(const torch::Tensor& latent) {
  check_latent(latent, config);
  return decode_latent(latent);
}

LatentDistribution AutoencoderKLImpl::encode_tiled(const torch::Tensor& image,
                                                   const VAETiling& tiling) {
  check_image(image, config);
  const int64_t f = config.downscale();
  check_tiling(tiling, f);
  if (image.size(2) <= tiling.tile && image.size(3) <= tiling.tile) return encode(image);
  const int64_t tile = tiling.tile / f, overlap = tiling.overlap / f;
  auto moments = run_tiled(image, tile_span(image.size(2) / f, tile, overlap),
                           tile_span(image.size(3) / f, tile, overlap), f, 1,
                           [&](const torch::Tensor& t) { return encode_moments(t); });
  return split_moments(moments.to(dtype()));
}

torch::Tensor AutoencoderKLImpl::decode_tiled(const torch::Tensor& latent,
                                              const VAETiling& tiling) {
  check_latent(latent, config);
  const int64_t f = config.downscale();
  check_tiling(tiling, f);
  const int64_t tile = tiling.tile / f, overlap = tiling.overlap / f;
  if (latent.size(2) <= tile && latent.size(3) <= tile) return decode(latent);
  return run_tiled(latent, tile_span(latent.size(2), tile, overlap),
                   tile_span(latent.size(3), tile, overlap), 1, f,
                   [&](const torch::Tensor& t) { return decode_latent(t); })
      .to(dtype());
}

}  // namespace lightning::models
