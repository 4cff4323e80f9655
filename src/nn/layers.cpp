#include "nn/layers.h"

#include <atomic>
#include <cmath>

#include <torch/autograd.h>
#include <torch/nn/init.h>

#include "nn/autocast.h"

namespace lightning::nn {
namespace {
thread_local bool t_skip_init = false;

// y = x W^T + b where W (and b) are frozen and held narrower than x (f16 weights, f32
// compute): W is converted for the product and again for the input's gradient, so that the
// backward pass keeps the narrow W instead of its converted copy (autograd would keep the copy:
// a UNet's worth of float32 weights for a LoRA student of f16 frozen weights).
class NarrowFrozenLinear : public torch::autograd::Function<NarrowFrozenLinear> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight,
                               const c10::optional<torch::Tensor>& bias) {
    ctx->save_for_backward({weight});
    return torch::linear(x, as_input(weight, x), bias ? as_input(*bias, x) : torch::Tensor());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto weight = ctx->get_saved_variables()[0];
    const auto& g = grads[0];
    return {g.matmul(weight.to(g.scalar_type())), torch::Tensor(), torch::Tensor()};
  }
};

// Whether the frozen, narrower weight of a linear layer would otherwise be kept converted for
// the backward pass. Under autocast the kept copy is autocast's own (bf16), as for float32
// weights.
bool keeps_converted_weight(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias) {
  return weight.scalar_type() != x.scalar_type() && !weight.requires_grad() &&
         !(bias.defined() && bias.requires_grad()) && x.requires_grad() &&
         torch::GradMode::is_enabled() && !AutocastState::current().enabled();
}

// A weight (or bias) as a matrix product or convolution takes it. Under autocast on x's device
// as it is: autocast casts it to its dtype anyway, and converting a narrow frozen weight to x's
// float32 first would write a float32 copy of every layer's weight at every step (for SDXL's
// UNet about 20 GB more memory traffic per forward, by a count of bytes; not measured). The
// result is the same: f16 and bf16 convert to float32 exactly. Else converted to x's dtype.
torch::Tensor as_operand(const torch::Tensor& parameter, const torch::Tensor& x) {
  if (parameter.defined() && parameter.scalar_type() != x.scalar_type()) {
    const auto autocast = AutocastState::current();
    if (x.is_cuda() ? autocast.cuda : x.is_cpu() && autocast.cpu) return parameter;
  }
  return as_input(parameter, x);
}

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

void copy_tensors(torch::nn::Module& dst, const torch::nn::Module& src,
                  const c10::optional<torch::Device>& device) {
  torch::NoGradGuard no_grad;
  auto copy = [&](torch::OrderedDict<std::string, torch::Tensor> to,
                  const torch::OrderedDict<std::string, torch::Tensor>& from) {
    TORCH_CHECK(to.size() == from.size(), "copy_tensors: the module trees differ");
    for (const auto& item : from) {
      auto* target = to.find(item.key());
      TORCH_CHECK(target, "copy_tensors: no '", item.key(), "' in the destination");
      auto data = item.value().detach().clone();
      target->set_data(device ? data.to(*device) : data);
    }
  };
  copy(dst.named_parameters(true), src.named_parameters(true));
  copy(dst.named_buffers(true), src.named_buffers(true));
}

LinearImpl::LinearImpl(int64_t in_features_, int64_t out_features_, bool bias_)
    : in_features(in_features_), out_features(out_features_), has_bias(bias_) {
  reset();
}

torch::Tensor as_input(const torch::Tensor& parameter, const torch::Tensor& x) {
  if (!parameter.defined() || parameter.scalar_type() == x.scalar_type()) return parameter;
  return parameter.to(x.scalar_type());
}

void LinearImpl::reset() {
  adapter.reset();  // clone() calls reset(): a clone never shares its original's adapter
  weight = register_parameter("weight", torch::empty({out_features, in_features}));
  bias = has_bias ? register_parameter("bias", torch::empty({out_features})) : torch::Tensor();
  if (!SkipInitGuard::active()) default_init(weight, bias, in_features);
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  if (flops::enabled()) flops::add(2.0 * (x.numel() / in_features) * in_features * out_features);
  auto y = keeps_converted_weight(x, weight, bias)
               ? NarrowFrozenLinear::apply(
                     x, weight, bias.defined() ? c10::optional<torch::Tensor>(bias) : c10::nullopt)
               : torch::linear(x, as_operand(weight, x), as_operand(bias, x));
  if (adapter) {
    const auto& a = *adapter;
    auto delta = torch::linear(torch::linear(x.to(a.down.scalar_type()), a.down), a.up);
    y = y + (delta * a.scale).to(y.scalar_type());
  }
  return y;
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
  adapter.reset();  // clone() calls reset(): a clone never shares its original's adapter
  weight = register_parameter("weight",
                              torch::empty({out_channels, in_channels, kernel_size, kernel_size}));
  bias = has_bias ? register_parameter("bias", torch::empty({out_channels})) : torch::Tensor();
  if (!SkipInitGuard::active()) default_init(weight, bias, in_channels * kernel_size * kernel_size);
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor& x) {
  auto y = torch::conv2d(x, as_operand(weight, x), as_operand(bias, x), {stride, stride},
                         {padding, padding});
  if (flops::enabled()) flops::add(2.0 * y.numel() * in_channels * kernel_size * kernel_size);
  if (adapter) {
    const auto& a = *adapter;
    auto h =
        torch::conv2d(x.to(a.down.scalar_type()), a.down, {}, {stride, stride}, {padding, padding});
    y = y + (torch::conv2d(h, a.up) * a.scale).to(y.scalar_type());
  }
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
  return torch::group_norm(x, num_groups, as_input(weight, x), as_input(bias, x), eps);
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
  return torch::layer_norm(x, {dim}, as_input(weight, x), as_input(bias, x), eps);
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
