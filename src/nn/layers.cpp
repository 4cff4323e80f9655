#include "nn/layers.h"

#include <atomic>
#include <cmath>

#include <torch/nn/init.h>

namespace lightning::nn {
namespace {
thread_local bool t_skip_init = false;

// PyTorch's default for Linear and Conv2d: kaiming_uniform_(a = sqrt(5)) on the weight,
// uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) on the bias.
void default_init(torch::Tensor& weight, torch::Tensor& bias, int64_t fan_in) {
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}
}  // namespace

namespace flops {
namespace {
std::atomic<bool> g_enabled{false};
std::atomic<double> g_total{0.0};
}  // namespace
void enable(bool on) {
  g_enabled = on;
}
bool enabled() {
  return g_enabled.load(std::memory_order_relaxed);
}
void add(double count) {
  double current = g_total.load(std::memory_order_relaxed);
  while (!g_total.compare_exchange_weak(current, current + count, std::memory_order_relaxed)) {
  }
}
double total() {
  return g_total.load();
}
void reset() {
  g_total = 0.0;
}
}  // namespace flops

SkipInitGuard::SkipInitGuard() : previous_(t_skip_init) {
  t_skip_init = true;
}
SkipInitGuard::~SkipInitGuard() {
  t_skip_init = previous_;
}
bool SkipInitGuard::active() {
  return t_skip_init;
}

LinearImpl::LinearImpl(int64_t in_features_, int64_t out_features_, bool bias_)
    : in_features(in_features_), out_features(out_features_), has_bias(bias_) {
  reset();
}

void LinearImpl::reset() {
  weight = register_parameter("weight", torch::empty({out_features, in_features}));
  bias = has_bias ? register_parameter("bias", torch::empty({out_features})) : torch::Tensor();
  if (!SkipInitGuard::active()) default_init(weight, bias, in_features);
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  if (flops::enabled()) flops::add(2.0 * (x.numel() / in_features) * in_features * out_features);
  return torch::linear(x, weight, bias);
}

Conv2dImpl::Conv2dImpl(int64_t in_channels_, int64_t out_channels_, int64_t kernel_size_,
                       int64_t stride_, int64_t padding_, bool bias_)
    : in_channels(in_channels_),
      out_channels(out_channels_),
      kernel_size(kernel_size_),
      stride(stride_),
      padding(padding_),
      has_bias(bias_) {
  reset();
}

void Conv2dImpl::reset() {
  weight = register_parameter("weight",
                              torch::empty({out_channels, in_channels, kernel_size, kernel_size}));
  bias = has_bias ? register_parameter("bias", torch::empty({out_channels})) : torch::Tensor();
  if (!SkipInitGuard::active()) default_init(weight, bias, in_channels * kernel_size * kernel_size);
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor& x) {
  auto y = torch::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
  if (flops::enabled()) flops::add(2.0 * y.numel() * in_channels * kernel_size * kernel_size);
  return y;
}

GroupNormImpl::GroupNormImpl(int64_t num_groups_, int64_t num_channels_, double eps_, bool affine_)
    : num_groups(num_groups_), num_channels(num_channels_), eps(eps_), affine(affine_) {
  reset();
}

void GroupNormImpl::reset() {
  if (affine) {
    weight = register_parameter("weight", torch::ones({num_channels}));
    bias = register_parameter("bias", torch::zeros({num_channels}));
  }
}

torch::Tensor GroupNormImpl::forward(const torch::Tensor& x) {
  return torch::group_norm(x, num_groups, weight, bias, eps);
}

LayerNormImpl::LayerNormImpl(int64_t dim_, double eps_, bool elementwise_affine_)
    : dim(dim_), eps(eps_), elementwise_affine(elementwise_affine_) {
  reset();
}

void LayerNormImpl::reset() {
  if (elementwise_affine) {
    weight = register_parameter("weight", torch::ones({dim}));
    bias = register_parameter("bias", torch::zeros({dim}));
  }
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor& x) {
  return torch::layer_norm(x, {dim}, weight, bias, eps);
}

EmbeddingImpl::EmbeddingImpl(int64_t num_embeddings_, int64_t embedding_dim_)
    : num_embeddings(num_embeddings_), embedding_dim(embedding_dim_) {
  reset();
}

void EmbeddingImpl::reset() {
  weight = register_parameter("weight", torch::empty({num_embeddings, embedding_dim}));
  if (!SkipInitGuard::active()) {
    torch::NoGradGuard no_grad;
    weight.normal_();
  }
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) {
  return torch::embedding(weight, ids);
}

}  // namespace lightning::nn
