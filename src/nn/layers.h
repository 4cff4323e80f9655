// Linear and Conv2d with diffusers-compatible parameter names ("weight", "bias") and an
// initialisation that can be skipped: constructing the 2.6B-parameter SDXL UNet only to
// overwrite it with loaded weights must not touch 10 GB of memory.
#pragma once

#include <memory>

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

namespace lightning::nn {

// Counts the floating-point operations (multiply-add = 2) of Linear, Conv2d and attention
// forwards while enabled, for the benchmark's GFLOP/s. Off by default; one relaxed atomic add per
// layer call when on.
namespace flops {
void enable(bool on);
bool enabled();
void add(double count);
double total();
void reset();
}  // namespace flops

// While alive on this thread, new Linear/Conv2d parameters are left uninitialised
// (torch::empty: virtual memory only). Used by loaders that fill every parameter afterwards.
class SkipInitGuard {
 public:
  SkipInitGuard();
  ~SkipInitGuard();
  SkipInitGuard(const SkipInitGuard&) = delete;
  SkipInitGuard& operator=(const SkipInitGuard&) = delete;
  static bool active();

 private:
  bool previous_;
};

// A low-rank update beside a Linear or Conv2d (LoRA, Hu et al. 2021): y += scale * up(down(x)).
// The tensors are not registered parameters, so the layer's state dict stays the base model's;
// models/lora.h attaches, collects, saves and merges adapters.
struct LowRankAdapter {
  torch::Tensor down;  // Linear: [r, in]; Conv2d: [r, in, k, k] (with the layer's stride, padding)
  torch::Tensor up;    // Linear: [out, r]; Conv2d: [out, r, 1, 1]
  double scale = 1.0;  // alpha / r, times the user's multiplier
  double alpha = 1.0;  // kohya's stored alpha (scale = alpha / r * multiplier)
};

// Copies every parameter and buffer of `src` into the same-named one of `dst` (fresh storage,
// on `device` when given, requires_grad kept from dst). The trees must match.
//
// Why: torch::nn::Cloneable::clone() re-creates a ModuleList's children but not the typed
// std::vector<Block> handles that the project's models iterate in forward, so a cloned UNet
// would run its freshly initialised blocks. Models with such lists override clone() with this.
void copy_tensors(torch::nn::Module& dst, const torch::nn::Module& src,
                  const c10::optional<torch::Device>& device = c10::nullopt);

// `parameter` in x's dtype: itself when they match or it is undefined, else a converted copy.
// Layers apply it to their weights so that a model can keep its weights in a narrower dtype
// than it computes in (f16 weights, f32 compute on CPU: half the memory, the same numbers as
// converting at load) - see models::ModelLoadOptions::weights_dtype.
torch::Tensor as_input(const torch::Tensor& parameter, const torch::Tensor& x);

// Mirrors torch.nn.Linear: y = x W^T + b, W [out, in], PyTorch's default init.
class LinearImpl : public torch::nn::Cloneable<LinearImpl> {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias = true);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [..., in] -> [..., out]

  int64_t in_features, out_features;
  bool has_bias;
  torch::Tensor weight, bias;
  std::shared_ptr<LowRankAdapter> adapter;  // optional LoRA (not part of the state dict)
};
TORCH_MODULE(Linear);

// Mirrors torch.nn.Conv2d (square kernel, symmetric padding, groups = 1).
class Conv2dImpl : public torch::nn::Cloneable<Conv2dImpl> {
 public:
  Conv2dImpl(int64_t in_channels, int64_t out_channels, int64_t kernel_size, int64_t stride = 1,
             int64_t padding = 0, bool bias = true);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [B, in, H, W] -> [B, out, H', W']

  int64_t in_channels, out_channels, kernel_size, stride, padding;
  bool has_bias;
  torch::Tensor weight, bias;
  std::shared_ptr<LowRankAdapter> adapter;  // optional LoRA (not part of the state dict)
};
TORCH_MODULE(Conv2d);

// torch.nn.GroupNorm / LayerNorm equivalents computed in the input's dtype, with
// "weight"/"bias" parameters (initialised to 1 / 0).
class GroupNormImpl : public torch::nn::Cloneable<GroupNormImpl> {
 public:
  GroupNormImpl(int64_t num_groups, int64_t num_channels, double eps, bool affine = true);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [B, C, ...]

  int64_t num_groups, num_channels;
  double eps;
  bool affine;
  torch::Tensor weight, bias;
};
TORCH_MODULE(GroupNorm);

class LayerNormImpl : public torch::nn::Cloneable<LayerNormImpl> {
 public:
  LayerNormImpl(int64_t dim, double eps, bool elementwise_affine = true);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [..., dim]

  int64_t dim;
  double eps;
  bool elementwise_affine;
  torch::Tensor weight, bias;
};
TORCH_MODULE(LayerNorm);

// Mirrors torch.nn.Embedding: a "weight" table [num_embeddings, dim] indexed by integer ids,
// N(0, 1) init (skipped under SkipInitGuard). Ids must be in range (callers check and name them).
class EmbeddingImpl : public torch::nn::Cloneable<EmbeddingImpl> {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t embedding_dim);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& ids);  // [...] integer -> [..., dim]

  int64_t num_embeddings, embedding_dim;
  torch::Tensor weight;
};
TORCH_MODULE(Embedding);

}  // namespace lightning::nn
