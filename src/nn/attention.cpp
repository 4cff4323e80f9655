#include "nn/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <torch/version.h>

#define LIGHTNING_HAS_SDPA (TORCH_VERSION_MAJOR >= 2)

namespace lightning::nn {
namespace {
int64_t g_chunk_bytes = 256ll << 20;
}

void set_attention_chunk_bytes(int64_t bytes) {
  g_chunk_bytes = std::max<int64_t>(bytes, 1);
}
int64_t attention_chunk_bytes() {
  return g_chunk_bytes;
}

torch::Tensor scaled_dot_product_attention(const torch::Tensor& q, const torch::Tensor& k,
                                           const torch::Tensor& v, double scale, bool upcast,
                                           bool causal) {
  // q k^T and probs v: 2 x (2 * Nq * Nk * D) per batch and head.
  if (flops::enabled()) flops::add(4.0 * q.size(0) * q.size(1) * q.size(2) * k.size(2) * q.size(3));
#if LIGHTNING_HAS_SDPA
  // The fused kernel's default scale is 1/sqrt(head_dim), the only scale diffusers uses here.
  if (!upcast && std::abs(scale * std::sqrt(static_cast<double>(q.size(-1))) - 1.0) < 1e-9) {
    return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                            /*is_causal=*/causal);
  }
#endif
  // Portable path: fold heads into the batch and process query rows in chunks so that the
  // score matrix of one chunk, [B*H, rows, Nk], stays under the byte budget.
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  const auto out_dtype = q.scalar_type();
  const auto compute = upcast ? torch::kFloat32 : out_dtype;
  auto qf = q.reshape({B * H, Nq, D}).to(compute);
  auto kt = k.reshape({B * H, Nk, D}).to(compute).transpose(1, 2);  // [BH, D, Nk]
  auto vf = v.reshape({B * H, Nk, D});
  const int64_t score_bytes_per_row = B * H * Nk * torch::elementSize(compute);
  const int64_t rows =
      std::clamp<int64_t>(g_chunk_bytes / std::max<int64_t>(score_bytes_per_row, 1), 1, Nq);
  auto out = torch::empty({B * H, Nq, D}, q.options());
  for (int64_t start = 0; start < Nq; start += rows) {
    const int64_t end = std::min(Nq, start + rows);
    auto scores = torch::bmm(qf.slice(1, start, end), kt);  // [BH, rows, Nk]
    scores.mul_(scale);
    if (causal) {
      // Query row r (absolute start + r) sees keys 0..start + r.
      auto row = torch::arange(start, end, torch::kLong).unsqueeze(1);
      auto col = torch::arange(Nk, torch::kLong).unsqueeze(0);
      scores.masked_fill_((col > row).to(scores.device()),
                          -std::numeric_limits<double>::infinity());
    }
    auto probs = torch::softmax(scores, -1).to(vf.scalar_type());
    out.slice(1, start, end).copy_(torch::bmm(probs, vf));
  }
  return out.view({B, H, Nq, D});
}

AttentionImpl::AttentionImpl(const AttentionOptions& options_) : options(options_) {
  reset();
}

void AttentionImpl::reset() {
  const int64_t inner = options.heads() * options.head_dim();
  const int64_t context_dim =
      options.cross_attention_dim() > 0 ? options.cross_attention_dim() : options.query_dim();
  to_q = register_module("to_q", Linear(options.query_dim(), inner, /*bias=*/false));
  to_k = register_module("to_k", Linear(context_dim, inner, /*bias=*/false));
  to_v = register_module("to_v", Linear(context_dim, inner, /*bias=*/false));
  out_proj = Linear(inner, options.query_dim(), /*bias=*/true);
  to_out = register_module("to_out", torch::nn::ModuleList(out_proj));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  const auto& ctx = context.defined() ? context : x;
  const int64_t B = x.size(0), N = x.size(1), M = ctx.size(1);
  const int64_t H = options.heads(), D = options.head_dim();
  // [B, N, H*D] -> [B, H, N, D]
  auto q = to_q(x).view({B, N, H, D}).transpose(1, 2);
  auto k = to_k(ctx).view({B, M, H, D}).transpose(1, 2);
  auto v = to_v(ctx).view({B, M, H, D}).transpose(1, 2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto h = scaled_dot_product_attention(q, k, v, scale, options.upcast_attention());
  h = h.transpose(1, 2).reshape({B, N, H * D});
  h = out_proj(h);
  if (options.dropout() > 0) h = torch::dropout(h, options.dropout(), is_training());
  return h;
}

}  // namespace lightning::nn
