// Timestep embeddings as diffusers.models.embeddings (get_timestep_embedding, Timesteps,
// TimestepEmbedding).
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/types.h>

#include "nn/layers.h"

namespace lightning::nn {

// Sinusoidal embedding of timesteps [N] (any numeric dtype) -> [N, dim] float32.
// freqs_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)), args = t * freqs (float32);
// output [sin, cos], or [cos, sin] with flip_sin_to_cos; odd dims are zero-padded.
torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                 double freq_shift, double max_period = 10000.0);

// diffusers TimestepEmbedding with act_fn silu and no cond projection:
// linear_1 -> SiLU -> linear_2.
class TimestepEmbeddingImpl : public torch::nn::Cloneable<TimestepEmbeddingImpl> {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [N, in] -> [N, time_embed_dim]

  int64_t in_channels, time_embed_dim;
  Linear linear_1{nullptr}, linear_2{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

}  // namespace lightning::nn
