// Transformer2DModel (continuous input) and its BasicTransformerBlock, as diffusers
// (models/transformers/transformer_2d.py, models/attention.py) with norm_type "layer_norm",
// activation "geglu", no positional embeddings.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>

#include "nn/attention.h"
#include "nn/layers.h"

namespace lightning::nn {

// diffusers GEGLU: proj = Linear(dim, 2 * inner); value, gate = chunk(2); value * gelu(gate).
class GEGLUImpl : public torch::nn::Cloneable<GEGLUImpl> {
 public:
  GEGLUImpl(int64_t dim_in, int64_t dim_out);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [..., dim_in] -> [..., dim_out]

  int64_t dim_in, dim_out;
  Linear proj{nullptr};
};
TORCH_MODULE(GEGLU);

// diffusers FeedForward with activation_fn "geglu", mult 4:
// net.0 = GEGLU(dim, 4*dim), net.1 = Dropout, net.2 = Linear(4*dim, dim).
class FeedForwardImpl : public torch::nn::Cloneable<FeedForwardImpl> {
 public:
  FeedForwardImpl(int64_t dim, int64_t mult = 4, double dropout = 0.0);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [..., dim] -> [..., dim]

  int64_t dim, mult;
  double dropout;
  GEGLU act{nullptr};
  Linear out{nullptr};
  torch::nn::ModuleList net{nullptr};
};
TORCH_MODULE(FeedForward);

struct TransformerOptions {
  TransformerOptions(int64_t heads, int64_t head_dim) : heads_(heads), head_dim_(head_dim) {}
  TORCH_ARG(int64_t, heads);
  TORCH_ARG(int64_t, head_dim);
  TORCH_ARG(int64_t, in_channels) = 0;          // Transformer2DModel only
  TORCH_ARG(int64_t, num_layers) = 1;           // Transformer2DModel only
  TORCH_ARG(int64_t, cross_attention_dim) = 0;  // 0: no cross-attention (attn2 self-attends)
  TORCH_ARG(int64_t, norm_num_groups) = 32;
  TORCH_ARG(bool, use_linear_projection) = false;
  TORCH_ARG(bool, only_cross_attention) = false;
  TORCH_ARG(bool, upcast_attention) = false;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(double, group_norm_eps) = 1e-6;  // the GroupNorm at the entry of Transformer2DModel
  TORCH_ARG(double, layer_norm_eps) = 1e-5;  // the LayerNorms of each block
};

// x = attn1(norm1(x)) + x; x = attn2(norm2(x), context) + x; x = ff(norm3(x)) + x.
class BasicTransformerBlockImpl : public torch::nn::Cloneable<BasicTransformerBlockImpl> {
 public:
  explicit BasicTransformerBlockImpl(const TransformerOptions& options);
  void reset() override;
  // x [B, N, dim], context [B, M, cross_attention_dim] -> [B, N, dim]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);

  TransformerOptions options;
  LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  Attention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

// GroupNorm -> proj_in (1x1 conv, or Linear after flattening with use_linear_projection) ->
// transformer_blocks -> proj_out -> + residual.
class Transformer2DModelImpl : public torch::nn::Cloneable<Transformer2DModelImpl> {
 public:
  explicit Transformer2DModelImpl(const TransformerOptions& options);
  void reset() override;
  // x [B, C, H, W], context [B, M, cross_attention_dim] -> [B, C, H, W]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);

  TransformerOptions options;
  GroupNorm norm{nullptr};
  torch::nn::AnyModule proj_in, proj_out;  // Conv2d 1x1 or Linear
  std::vector<BasicTransformerBlock> blocks;
  torch::nn::ModuleList transformer_blocks{nullptr};
};
TORCH_MODULE(Transformer2DModel);

}  // namespace lightning::nn
