// Multi-head attention as diffusers' Attention (attention_processor.py) is used by
// BasicTransformerBlock: to_q/to_k/to_v without bias, to_out.0 with bias, scale 1/sqrt(head_dim).
#pragma once

#include <cstdint>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>

#include "nn/layers.h"

namespace lightning::nn {

// Bytes that one chunk of attention scores may take in the portable (non-fused) path. The
// default, 256 MiB, keeps a 128x128-latent SDXL forward (4096 tokens, 10 heads) from
// materialising all heads' score matrices (671 MB per image in f32) at once.
void set_attention_chunk_bytes(int64_t bytes);
int64_t attention_chunk_bytes();

// softmax(q k^T * scale) v for q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D].
// Uses libtorch's fused at::scaled_dot_product_attention where it exists (PyTorch >= 2.0,
// unless `upcast` asks for f32 scores); otherwise computes in query chunks bounded by
// attention_chunk_bytes(). `upcast` computes scores and softmax in f32 (diffusers'
// upcast_attention) and returns the input dtype. `causal` lets query i see keys 0..i only
// (requires Nq == Nk; CLIP's text encoder).
torch::Tensor scaled_dot_product_attention(const torch::Tensor& q, const torch::Tensor& k,
                                           const torch::Tensor& v, double scale, bool upcast,
                                           bool causal = false);

struct AttentionOptions {
  AttentionOptions(int64_t query_dim, int64_t heads, int64_t head_dim)
      : query_dim_(query_dim), heads_(heads), head_dim_(head_dim) {}
  TORCH_ARG(int64_t, query_dim);
  TORCH_ARG(int64_t, heads);
  TORCH_ARG(int64_t, head_dim);
  // Width of the context for cross-attention; 0 means self-attention (context = query_dim).
  TORCH_ARG(int64_t, cross_attention_dim) = 0;
  TORCH_ARG(bool, upcast_attention) = false;
  TORCH_ARG(double, dropout) = 0.0;
};

// Mirrors diffusers.models.attention_processor.Attention with AttnProcessor(2_0), 3-D input.
class AttentionImpl : public torch::nn::Cloneable<AttentionImpl> {
 public:
  explicit AttentionImpl(const AttentionOptions& options);
  void reset() override;
  // x [B, N, query_dim]; context [B, M, cross_attention_dim] or undefined for self-attention.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context = {});

  AttentionOptions options;
  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, out_proj{nullptr};
  torch::nn::ModuleList to_out{nullptr};  // [0] = out_proj (diffusers: to_out.0), dropout follows
};
TORCH_MODULE(Attention);

}  // namespace lightning::nn
