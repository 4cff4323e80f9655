#include "models/unet.h"

#include "core/error.h"
#include "nn/checkpoint.h"

namespace lightning::models {
namespace {
std::string shape_str(const torch::Tensor& t) {
  return t.defined() ? fmt::format("[{}]", fmt::join(t.sizes(), ", ")) : "(absent)";
}
}  // namespace

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNetConfig& config_, bool encoder_only_)
    : config(config_), encoder_only(encoder_only_) {
  reset();
}

void UNet2DConditionModelImpl::reset() {
  const auto& c = config;
  const size_t n = c.num_blocks();
  const int64_t temb = c.time_embed_dim();
  const int64_t ch0 = c.block_out_channels[0];

  conv_in = register_module(
      "conv_in", nn::Conv2d(c.in_channels, ch0, c.conv_in_kernel, 1, (c.conv_in_kernel - 1) / 2));
  // time_proj (Timesteps) has no parameters: nn::timestep_embedding in forward.
  time_embedding = register_module("time_embedding", nn::TimestepEmbedding(ch0, temb));
  if (c.addition_embed_type == "text_time") {
    add_embedding = register_module(
        "add_embedding", nn::TimestepEmbedding(c.projection_class_embeddings_input_dim, temb));
  }

  auto block_options = [&](size_t i) {
    UNetBlockOptions o;
    o.temb_channels = temb;
    o.num_heads = c.num_heads[i];
    o.cross_attention_dim = c.cross_attention_dim[i];
    o.use_linear_projection = c.use_linear_projection;
    o.only_cross_attention = c.only_cross_attention[i];
    o.upcast_attention = c.upcast_attention;
    o.norm_num_groups = c.norm_num_groups;
    o.norm_eps = c.norm_eps;
    o.dropout = c.dropout;
    return o;
  };

  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  down_list.clear();
  int64_t output_channel = ch0;
  for (size_t i = 0; i < n; ++i) {
    auto o = block_options(i);
    o.in_channels = output_channel;
    output_channel = c.block_out_channels[i];
    o.out_channels = output_channel;
    o.num_layers = c.layers_per_block[i];
    o.has_attention = c.down_block_types[i] == "CrossAttnDownBlock2D";
    o.transformer_layers = c.transformer_layers_per_block[i];
    o.add_sampler = i + 1 < n;
    o.downsample_padding = c.downsample_padding;
    down_list.push_back(DownBlock(o));
    down_blocks->push_back(down_list.back());
  }

  if (!c.mid_block_type.empty()) {
    auto o = block_options(n - 1);
    o.in_channels = o.out_channels = c.block_out_channels.back();
    o.num_layers = 1;
    o.has_attention = true;
    o.transformer_layers = c.mid_transformer_layers();
    o.only_cross_attention = false;  // diffusers does not pass it to UNetMidBlock2DCrossAttn
    o.output_scale_factor = c.mid_block_scale_factor;
    mid_block = register_module("mid_block", MidBlock(o));
  }

  up_list.clear();
  if (encoder_only) return;
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  output_channel = c.block_out_channels.back();
  for (size_t i = 0; i < n; ++i) {
    const size_t r = n - 1 - i;  // the matching down block
    auto o = block_options(r);
    o.prev_output_channels = output_channel;
    output_channel = c.block_out_channels[r];
    o.out_channels = output_channel;
    o.in_channels = c.block_out_channels[r == 0 ? 0 : r - 1];
    o.num_layers = c.layers_per_block[r] + 1;
    o.has_attention = c.up_block_types[i] == "CrossAttnUpBlock2D";
    o.transformer_layers = c.reverse_transformer_layers_per_block[i];
    o.add_sampler = i + 1 < n;
    up_list.push_back(UpBlock(o));
    up_blocks->push_back(up_list.back());
  }

  conv_norm_out =
      register_module("conv_norm_out", nn::GroupNorm(c.norm_num_groups, ch0, c.norm_eps));
  conv_out = register_module("conv_out", nn::Conv2d(ch0, c.out_channels, c.conv_out_kernel, 1,
                                                    (c.conv_out_kernel - 1) / 2));
}

std::shared_ptr<torch::nn::Module> UNet2DConditionModelImpl::clone(
    const c10::optional<torch::Device>& device) const {
  std::shared_ptr<UNet2DConditionModelImpl> copy;
  {
    nn::SkipInitGuard skip_init;
    copy = std::make_shared<UNet2DConditionModelImpl>(config, encoder_only);
  }
  nn::copy_tensors(*copy, *this, device);
  copy->compute_dtype = compute_dtype;
  copy->train(is_training());
  return copy;
}

size_t UNet2DConditionModelImpl::num_skip_states() const {
  return skip_channels().size();
}

std::vector<int64_t> UNet2DConditionModelImpl::skip_channels() const {
  std::vector<int64_t> out = {config.block_out_channels[0]};  // conv_in output
  for (size_t i = 0; i < config.num_blocks(); ++i) {
    for (int64_t l = 0; l < config.layers_per_block[i]; ++l)
      out.push_back(config.block_out_channels[i]);
    if (i + 1 < config.num_blocks()) out.push_back(config.block_out_channels[i]);
  }
  return out;
}

void UNet2DConditionModelImpl::check_inputs(const UNetInputs& in) const {
  const auto& c = config;
  if (!in.sample.defined() || in.sample.dim() != 4 || in.sample.size(1) != c.in_channels)
    fail("input 'sample': expected [B, {}, H, W], got {}", c.in_channels, shape_str(in.sample));
  const int64_t B = in.sample.size(0);
  if (!in.timestep.defined() || in.timestep.dim() > 1 ||
      (in.timestep.dim() == 1 && in.timestep.size(0) != B && in.timestep.size(0) != 1))
    fail("input 'timestep': expected [] or [{}], got {}", B, shape_str(in.timestep));
  const auto& ehs = in.encoder_hidden_states;
  const int64_t cross = c.cross_attention_dim[0];
  if (!ehs.defined() || ehs.dim() != 3 || ehs.size(0) != B || ehs.size(2) != cross)
    fail("input 'encoder_hidden_states': expected [{}, tokens, {}], got {}", B, cross,
         shape_str(ehs));
  if (c.addition_embed_type == "text_time") {
    const int64_t time_ids = 6;  // original size, crop top-left, target size (SDXL)
    const int64_t pooled =
        c.projection_class_embeddings_input_dim - time_ids * c.addition_time_embed_dim;
    if (!in.text_embeds.defined() || in.text_embeds.dim() != 2 || in.text_embeds.size(0) != B ||
        in.text_embeds.size(1) != pooled)
      fail("input 'text_embeds': expected [{}, {}], got {}", B, pooled, shape_str(in.text_embeds));
    if (!in.time_ids.defined() || in.time_ids.dim() != 2 || in.time_ids.size(0) != B ||
        in.time_ids.size(1) * c.addition_time_embed_dim + pooled !=
            c.projection_class_embeddings_input_dim)
      fail("input 'time_ids': expected [{}, {}], got {}", B, time_ids, shape_str(in.time_ids));
  }
  if (!in.down_residuals.empty() && in.down_residuals.size() != num_skip_states())
    fail("ControlNet residuals: expected {} down residuals (down_0..down_{}), got {}",
         num_skip_states(), num_skip_states() - 1, in.down_residuals.size());
}

namespace {
// A residual of the state's shape, or pooled to 1x1 (a ControlNet with global_pool_conditions),
// which diffusers adds by broadcasting.
bool residual_fits(const torch::Tensor& residual, const torch::Tensor& state) {
  if (residual.sizes() == state.sizes()) return true;
  return residual.dim() == 4 && residual.size(0) == state.size(0) &&
         residual.size(1) == state.size(1) && residual.size(2) == 1 && residual.size(3) == 1;
}
}  // namespace

UNet2DConditionModelImpl::Encoded UNet2DConditionModelImpl::run_down(
    const UNetInputs& in, const torch::Tensor& added_after_conv_in) {
  check_inputs(in);
  const auto& c = config;
  auto sample = in.sample;
  const int64_t B = sample.size(0);
  const auto dtype = this->dtype();
  if (sample.scalar_type() != dtype) sample = sample.to(dtype);
  if (c.center_input_sample) sample = 2 * sample - 1.0;

  // Time embedding: sinusoidal in f32, then cast to the model dtype (diffusers get_time_embed).
  auto timesteps = in.timestep.reshape({-1}).to(sample.device());
  if (timesteps.size(0) == 1) timesteps = timesteps.expand({B});
  auto t_emb =
      nn::timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
          .to(dtype);
  auto emb = time_embedding(t_emb);
  if (add_embedding) {
    // SDXL: each of the six time ids gets its own embedding; [B, 6 * dim] after the pooled text.
    auto time_embeds =
        nn::timestep_embedding(in.time_ids.reshape({-1}).to(sample.device()),
                               c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            .reshape({B, -1});
    auto add_embeds =
        torch::cat({in.text_embeds.to(time_embeds.device()).to(torch::kFloat32), time_embeds}, -1)
            .to(dtype);
    emb = emb + add_embedding(add_embeds);
  }
  auto context = in.encoder_hidden_states.to(dtype);

  sample = conv_in(sample);
  if (added_after_conv_in.defined()) {
    if (added_after_conv_in.sizes() != sample.sizes())
      fail("ControlNet conditioning embedding: expected {}, got {}", shape_str(sample),
           shape_str(added_after_conv_in));
    sample = sample + added_after_conv_in.to(sample.scalar_type());
  }
  std::vector<torch::Tensor> skips = {sample};
  for (auto& block : down_list) {
    // A down block's output is its last skip state.
    auto states = run_block(
        [block](const std::vector<torch::Tensor>& v) mutable {
          return block(v[0], v[1], v[2]).second;
        },
        {sample, emb, context});
    sample = states.back();
    skips.insert(skips.end(), states.begin(), states.end());
  }
  return {sample, emb, context, std::move(skips)};
}

std::vector<torch::Tensor> UNet2DConditionModelImpl::run_block(
    const nn::CheckpointedFn& fn, const std::vector<torch::Tensor>& inputs) {
  return gradient_checkpointing ? nn::checkpoint(fn, inputs) : fn(inputs);
}

torch::Tensor UNet2DConditionModelImpl::run_mid(const torch::Tensor& sample,
                                                const torch::Tensor& emb,
                                                const torch::Tensor& context) {
  auto mid = mid_block;
  return run_block(
      [mid](const std::vector<torch::Tensor>& v) mutable {
        return std::vector<torch::Tensor>{mid(v[0], v[1], v[2])};
      },
      {sample, emb, context})[0];
}

torch::Tensor UNet2DConditionModelImpl::encode(const UNetInputs& in) {
  auto e = run_down(in);
  return mid_block ? run_mid(e.sample, e.emb, e.context) : e.sample;
}

torch::Tensor UNet2DConditionModelImpl::forward(const UNetInputs& in) {
  if (encoder_only) fail("this UNet was built encoder-only (a discriminator backbone): no forward");
  auto [sample, emb, context, skips] = run_down(in);
  const auto& c = config;
  // When the input is not a multiple of the total upsampling factor, each upsampler is told
  // the size of the skip it will be concatenated with.
  const int64_t factor = int64_t{1} << (c.num_blocks() - 1);
  const bool forward_upsample_size =
      in.sample.size(2) % factor != 0 || in.sample.size(3) % factor != 0;
  const auto dtype = this->dtype();
  if (!in.down_residuals.empty()) {
    for (size_t i = 0; i < skips.size(); ++i) {
      if (!residual_fits(in.down_residuals[i], skips[i]))
        fail("ControlNet residual 'down_{}': expected {}, got {}", i, shape_str(skips[i]),
             shape_str(in.down_residuals[i]));
      skips[i] = skips[i] + in.down_residuals[i].to(dtype);
    }
  }
  if (mid_block) sample = run_mid(sample, emb, context);
  if (in.mid_residual.defined()) {
    if (!residual_fits(in.mid_residual, sample))
      fail("ControlNet residual 'mid': expected {}, got {}", shape_str(sample),
           shape_str(in.mid_residual));
    sample = sample + in.mid_residual.to(dtype);
  }

  for (size_t i = 0; i < up_list.size(); ++i) {
    const size_t count = up_list[i]->resnet_list.size();
    std::vector<torch::Tensor> block_skips(skips.end() - count, skips.end());
    skips.resize(skips.size() - count);
    c10::optional<std::vector<int64_t>> upsample_size;
    if (i + 1 < up_list.size() && forward_upsample_size)
      upsample_size = std::vector<int64_t>{skips.back().size(2), skips.back().size(3)};
    std::vector<torch::Tensor> inputs = {sample, emb, context};
    inputs.insert(inputs.end(), block_skips.begin(), block_skips.end());
    auto up = up_list[i];
    sample = run_block(
        [up, upsample_size](const std::vector<torch::Tensor>& v) mutable {
          return std::vector<torch::Tensor>{up(
              v[0], std::vector<torch::Tensor>(v.begin() + 3, v.end()), v[1], v[2], upsample_size)};
        },
        inputs)[0];
  }
  sample = torch::silu(conv_norm_out(sample));
  return conv_out(sample);
}

}  // namespace lightning::models
