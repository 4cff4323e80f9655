#include "nn/transformer.h"

namespace lightning::nn {

GEGLUImpl::GEGLUImpl(int64_t dim_in_, int64_t dim_out_) : dim_in(dim_in_), dim_out(dim_out_) {
  reset();
}

void GEGLUImpl::reset() {
  proj = register_module("proj", Linear(dim_in, dim_out * 2));
}

torch::Tensor GEGLUImpl::forward(const torch::Tensor& x) {
  auto h = proj(x);
  auto parts = h.chunk(2, -1);              // value (first half), gate (second half)
  return parts[0] * torch::gelu(parts[1]);  // exact (erf) GELU
}

FeedForwardImpl::FeedForwardImpl(int64_t dim_, int64_t mult_, double dropout_)
    : dim(dim_), mult(mult_), dropout(dropout_) {
  reset();
}

void FeedForwardImpl::reset() {
  act = GEGLU(dim, dim * mult);
  out = Linear(dim * mult, dim);
  net = register_module("net", torch::nn::ModuleList(act, torch::nn::Dropout(dropout), out));
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x) {
  auto h = act(x);
  if (dropout > 0) h = torch::dropout(h, dropout, is_training());
  return out(h);
}

BasicTransformerBlockImpl::BasicTransformerBlockImpl(const TransformerOptions& options_)
    : options(options_) {
  reset();
}

void BasicTransformerBlockImpl::reset() {
  const int64_t dim = options.heads() * options.head_dim();
  const double eps = options.layer_norm_eps();
  norm1 = register_module("norm1", LayerNorm(dim, eps));
  // With only_cross_attention, attn1 attends to the context as well.
  attn1 = register_module(
      "attn1", Attention(AttentionOptions(dim, options.heads(), options.head_dim())
                             .cross_attention_dim(
                                 options.only_cross_attention() ? options.cross_attention_dim() : 0)
                             .upcast_attention(options.upcast_attention())
                             .dropout(options.dropout())));
  norm2 = register_module("norm2", LayerNorm(dim, eps));
  attn2 =
      register_module("attn2", Attention(AttentionOptions(dim, options.heads(), options.head_dim())
                                             .cross_attention_dim(options.cross_attention_dim())
                                             .upcast_attention(options.upcast_attention())
                                             .dropout(options.dropout())));
  norm3 = register_module("norm3", LayerNorm(dim, eps));
  ff = register_module("ff", FeedForward(dim, 4, options.dropout()));
}

torch::Tensor BasicTransformerBlockImpl::forward(const torch::Tensor& x,
                                                 const torch::Tensor& context) {
  const bool cross = options.cross_attention_dim() > 0;
  auto h = attn1(norm1(x), options.only_cross_attention() ? context : torch::Tensor()) + x;
  h = attn2(norm2(h), cross ? context : torch::Tensor()) + h;
  return ff(norm3(h)) + h;
}

Transformer2DModelImpl::Transformer2DModelImpl(const TransformerOptions& options_)
    : options(options_) {
  reset();
}

void Transformer2DModelImpl::reset() {
  const int64_t in = options.in_channels();
  const int64_t inner = options.heads() * options.head_dim();
  norm =
      register_module("norm", GroupNorm(options.norm_num_groups(), in, options.group_norm_eps()));
  if (options.use_linear_projection()) {
    proj_in = torch::nn::AnyModule(register_module("proj_in", Linear(in, inner)));
  } else {
    proj_in = torch::nn::AnyModule(register_module("proj_in", Conv2d(in, inner, 1)));
  }
  transformer_blocks = register_module("transformer_blocks", torch::nn::ModuleList());
  blocks.clear();
  for (int64_t i = 0; i < options.num_layers(); ++i) {
    blocks.push_back(BasicTransformerBlock(options));
    transformer_blocks->push_back(blocks.back());
  }
  if (options.use_linear_projection()) {
    proj_out = torch::nn::AnyModule(register_module("proj_out", Linear(inner, in)));
  } else {
    proj_out = torch::nn::AnyModule(register_module("proj_out", Conv2d(inner, in, 1)));
  }
}

torch::Tensor Transformer2DModelImpl::forward(const torch::Tensor& x,
                                              const torch::Tensor& context) {
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  auto h = norm(x);
  int64_t inner;
  if (options.use_linear_projection()) {
    h = h.permute({0, 2, 3, 1}).reshape({B, H * W, -1});  // [B, HW, C]
    h = proj_in.forward(h);                               // [B, HW, inner]
    inner = h.size(2);
  } else {
    h = proj_in.forward(h);  // [B, inner, H, W]
    inner = h.size(1);
    h = h.permute({0, 2, 3, 1}).reshape({B, H * W, inner});
  }
  for (auto& block : blocks)
    h = block(h, context);
  if (options.use_linear_projection()) {
    h = proj_out.forward(h);
    h = h.reshape({B, H, W, -1}).permute({0, 3, 1, 2}).contiguous();
  } else {
    h = h.reshape({B, H, W, inner}).permute({0, 3, 1, 2}).contiguous();
    h = proj_out.forward(h);
  }
  return h + x;
}

}  // namespace lightning::nn
