#include "nn/embeddings.h"

#include <cmath>

namespace lightning::nn {

torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                 double freq_shift, double max_period) {
  const int64_t half = dim / 2;
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(timesteps.device());
  // exponent = -ln(max_period) * arange(half) / (half - shift), all in float32 as diffusers.
  auto exponent = torch::arange(0, half, f32) * static_cast<float>(-std::log(max_period));
  exponent = exponent / static_cast<float>(half - freq_shift);
  auto args = timesteps.reshape({-1, 1}).to(torch::kFloat32) * torch::exp(exponent).unsqueeze(0);
  auto emb = flip_sin_to_cos ? torch::cat({torch::cos(args), torch::sin(args)}, -1)
                             : torch::cat({torch::sin(args), torch::cos(args)}, -1);
  if (dim % 2 == 1) emb = torch::constant_pad_nd(emb, {0, 1});
  return emb;
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels_, int64_t time_embed_dim_)
    : in_channels(in_channels_), time_embed_dim(time_embed_dim_) {
  reset();
}

void TimestepEmbeddingImpl::reset() {
  linear_1 = register_module("linear_1", Linear(in_channels, time_embed_dim));
  linear_2 = register_module("linear_2", Linear(time_embed_dim, time_embed_dim));
}

torch::Tensor TimestepEmbeddingImpl::forward(const torch::Tensor& x) {
  return linear_2(torch::silu(linear_1(x)));
}

}  // namespace lightning::nn
