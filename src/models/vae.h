// AutoencoderKL as diffusers.models.autoencoders.autoencoder_kl (v0.27.2): the KL VAE of Stable
// Diffusion and SDXL, built from a diffusers vae/config.json. Submodule names equal diffusers'
// (encoder.down_blocks.0.resnets.0.conv1, decoder.mid_block.attentions.0.to_q, quant_conv ...).
//
// Tiled encode and decode split large inputs into overlapping tiles, run each tile alone and
// blend the overlaps with linear ramps, so that memory is bounded by the tile size, not by the
// image. As in diffusers and stable-diffusion.cpp, each tile has its own GroupNorm statistics and
// its own attention context, so tiled output differs slightly from untiled; the ramps keep that
// difference free of seams.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>
#include <nlohmann/json.hpp>

#include "nn/layers.h"
#include "nn/resnet.h"
#include "nn/sampling.h"

namespace lightning::models {

struct VAEConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  int64_t latent_channels = 4;
  std::vector<int64_t> block_out_channels{64};  // SD/SDXL: 128, 256, 512, 512
  int64_t layers_per_block = 1;                 // SD/SDXL: 2 (the decoder has one more)
  int64_t norm_num_groups = 32;
  int64_t sample_size = 32;         // informational (image size the VAE was trained at)
  double scaling_factor = 0.18215;  // SDXL: 0.13025
  double shift_factor = 0;          // latent = (mean - shift) * scale; SD/SDXL: none
  // Per-channel latent statistics (e.g. Playground v2.5); when given they replace shift_factor:
  // latent = (mean - latents_mean) * scale / latents_std, as diffusers' SDXL pipeline does.
  std::vector<double> latents_mean, latents_std;
  bool force_upcast = true;  // decode in f32 when the pipeline runs in f16 (SDXL)
  bool mid_block_add_attention = true;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;

  // The VAE's latent (the distribution's mean or a sample) -> the UNet's latent space, and back
  // (decode input).
  torch::Tensor to_unet_latent(const torch::Tensor& latent) const;
  torch::Tensor from_unet_latent(const torch::Tensor& latent) const;

  // Image pixels per latent pixel: 2^(levels - 1), 8 for SD/SDXL.
  int64_t downscale() const { return int64_t{1} << (block_out_channels.size() - 1); }

  // Reads a diffusers config.json object; `file` names it in errors. Refuses unknown keys and
  // block types other than DownEncoderBlock2D / UpDecoderBlock2D, activations other than SiLU.
  static VAEConfig from_json(const nlohmann::json& json, const std::string& file);
  nlohmann::json to_json() const;
  void validate(const std::string& file) const;

  // SDXL's VAE (stabilityai/sdxl-vae) and a tiny one for tests.
  static VAEConfig sdxl();
  static VAEConfig tiny();
};

// diffusers' Attention as UNetMidBlock2D builds it for the VAE: GroupNorm, one head over all
// channels, q/k/v/out projections with bias, residual connection, f32 softmax.
class VAEAttentionImpl : public torch::nn::Cloneable<VAEAttentionImpl> {
 public:
  VAEAttentionImpl(int64_t channels, int64_t groups);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [B, C, H, W] -> same

  int64_t channels, groups;
  nn::GroupNorm group_norm{nullptr};
  nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, out_proj{nullptr};
  torch::nn::ModuleList to_out{nullptr};
};
TORCH_MODULE(VAEAttention);

// UNetMidBlock2D without time embedding: resnets.0, then (attentions.0, resnets.1).
class VAEMidBlockImpl : public torch::nn::Cloneable<VAEMidBlockImpl> {
 public:
  VAEMidBlockImpl(int64_t channels, int64_t groups, bool add_attention);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);

  int64_t channels, groups;
  bool add_attention;
  std::vector<nn::ResnetBlock2D> resnet_list;
  VAEAttention attention{nullptr};
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};
};
TORCH_MODULE(VAEMidBlock);

// DownEncoderBlock2D (sampler = down: pad right/bottom, stride-2 conv) or UpDecoderBlock2D
// (sampler = up: nearest x2, conv): resnets, then the optional sampler.
class VAEBlockImpl : public torch::nn::Cloneable<VAEBlockImpl> {
 public:
  enum class Sampler { none, down, up };
  VAEBlockImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, int64_t groups,
               Sampler sampler);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);

  int64_t in_channels, out_channels, num_layers, groups;
  Sampler sampler;
  std::vector<nn::ResnetBlock2D> resnet_list;
  nn::Downsample2D downsampler{nullptr};
  nn::Upsample2D upsampler{nullptr};
  torch::nn::ModuleList resnets{nullptr}, downsamplers{nullptr}, upsamplers{nullptr};
};
TORCH_MODULE(VAEBlock);

// Image [B, in, H, W] -> moments [B, 2 * latent, H / f, W / f] (before quant_conv).
class VAEEncoderImpl : public torch::nn::Cloneable<VAEEncoderImpl> {
 public:
  explicit VAEEncoderImpl(const VAEConfig& config);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);

  VAEConfig config;
  nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  std::vector<VAEBlock> block_list;
  VAEMidBlock mid_block{nullptr};
  nn::GroupNorm conv_norm_out{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
};
TORCH_MODULE(VAEEncoder);

// Latent [B, latent, h, w] (after post_quant_conv) -> image [B, out, h * f, w * f].
class VAEDecoderImpl : public torch::nn::Cloneable<VAEDecoderImpl> {
 public:
  explicit VAEDecoderImpl(const VAEConfig& config);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& z);

  VAEConfig config;
  nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  std::vector<VAEBlock> block_list;
  VAEMidBlock mid_block{nullptr};
  nn::GroupNorm conv_norm_out{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
};
TORCH_MODULE(VAEDecoder);

// Tiling, in image pixels. A side longer than `tile` is split into the fewest tiles of at most
// `tile` pixels that overlap by at least `overlap`; both must be multiples of the VAE's downscale
// factor.
struct VAETiling {
  int64_t tile = 512;
  int64_t overlap = 64;
};

struct LatentDistribution {
  torch::Tensor mean, logvar;  // [B, latent, h, w]; logvar clamped to [-30, 20] as diffusers
  // mean + exp(logvar / 2) * noise (noise from `generator`).
  torch::Tensor sample(c10::optional<at::Generator> generator = c10::nullopt) const;
};

class AutoencoderKLImpl : public torch::nn::Cloneable<AutoencoderKLImpl> {
 public:
  explicit AutoencoderKLImpl(const VAEConfig& config);
  void reset() override;

  // Image in [-1, 1], [B, in_channels, H, W] with H, W multiples of downscale() -> the latent
  // distribution (not scaled: multiply by scaling_factor for the UNet). Throws on bad shapes.
  LatentDistribution encode(const torch::Tensor& image);
  // Latent (already divided by scaling_factor) -> image, nominally in [-1, 1].
  torch::Tensor decode(const torch::Tensor& latent);

  // As encode / decode, tile by tile when a side exceeds tiling.tile (pixels).
  LatentDistribution encode_tiled(const torch::Tensor& image, const VAETiling& tiling);
  torch::Tensor decode_tiled(const torch::Tensor& latent, const VAETiling& tiling);

  // The dtype encode/decode compute in (inputs are converted to it); unset: the weights' dtype.
  std::optional<torch::ScalarType> compute_dtype;
  torch::ScalarType dtype() const {
    return compute_dtype.value_or(decoder->conv_in->weight.scalar_type());
  }

  VAEConfig config;
  VAEEncoder encoder{nullptr};
  VAEDecoder decoder{nullptr};
  nn::Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};

 private:
  torch::Tensor encode_moments(const torch::Tensor& image);
  torch::Tensor decode_latent(const torch::Tensor& latent);
};
TORCH_MODULE(AutoencoderKL);

// The tiles along one side of `length` latent pixels: the fewest tiles of at most `max_tile`
// that overlap by at least `overlap`, each of the same (smallest sufficient) size, spread evenly
// from 0 to flush with the end. One tile of `length` when it fits.
struct TileSpan {
  int64_t size = 0;
  std::vector<int64_t> starts;
};
TileSpan tile_span(int64_t length, int64_t max_tile, int64_t overlap);

}  // namespace lightning::models
