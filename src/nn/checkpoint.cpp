#include "nn/checkpoint.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>

#include "nn/autocast.h"

namespace lightning::nn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autocast's weight-cast cache off for a scope.
struct CacheOff {
  CacheOff() : previous(at::autocast::is_autocast_cache_enabled()) {
    at::autocast::set_autocast_cache_enabled(false);
  }
  ~CacheOff() { at::autocast::set_autocast_cache_enabled(previous); }
  bool previous;
};

// The block's function, kept in the autograd context until the backward pass.
struct FnHolder : torch::CustomClassHolder {
  explicit FnHolder(CheckpointedFn f) : fn(std::move(f)) {}
  CheckpointedFn fn;
  // The forward pass's autocast state, re-applied while the backward pass recomputes it (as
  // torch.utils.checkpoint does), so that the recomputed activations are the ones used.
  AutocastState autocast;
};

struct Checkpointed : torch::autograd::Function<Checkpointed> {
  // inputs: the block's inputs and, last, an empty tensor that requires grad (the anchor: the
  // outputs then require grad, so the backward pass reaches the block's parameters).
  static variable_list forward(AutogradContext* ctx, at::TensorList list,
                               c10::intrusive_ptr<FnHolder> holder) {
    const variable_list inputs = list.vec();
    ctx->save_for_backward(inputs);
    holder->autocast = AutocastState::current();
    // Autocast caches its casts of trainable weights for the region; casts made here, without
    // grad mode, would then serve a later forward pass of the region that needs their
    // gradients. So none are cached (nor reused) inside a checkpointed block.
    const CacheOff cache_off;
    auto outputs = holder->fn(variable_list(inputs.begin(), inputs.end() - 1));
    ctx->saved_data["fn"] = c10::IValue::make_capsule(std::move(holder));
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto holder =
        c10::static_intrusive_pointer_cast<FnHolder>(ctx->saved_data.at("fn").toCapsule());
    variable_list inputs;
    for (size_t i = 0; i + 1 < saved.size(); ++i) {
      auto x = saved[i].defined() ? saved[i].detach() : torch::Tensor();
      if (x.defined() && x.is_floating_point() && ctx->needs_input_grad(i)) x.requires_grad_(true);
      inputs.push_back(x);
    }
    variable_list outputs;
    {
      torch::AutoGradMode enable(true);
      const CacheOff cache_off;
      const AutocastScope autocast(holder->autocast);
      outputs = holder->fn(inputs);
    }
    variable_list roots, root_grads;
    for (size_t k = 0; k < outputs.size() && k < grads.size(); ++k)
      if (outputs[k].defined() && outputs[k].requires_grad() && grads[k].defined()) {
        roots.push_back(outputs[k]);
        root_grads.push_back(grads[k]);
      }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    variable_list result;
    for (const auto& x : inputs)
      result.push_back(x.defined() && x.requires_grad() ? x.grad() : torch::Tensor());
    result.emplace_back();  // the anchor
    result.emplace_back();  // the function
    return result;
  }
};

}  // namespace

std::vector<torch::Tensor> checkpoint(const CheckpointedFn& fn,
                                      const std::vector<torch::Tensor>& inputs) {
  if (!torch::GradMode::is_enabled()) return fn(inputs);
  variable_list with_anchor = inputs;
  with_anchor.push_back(torch::empty({0}, torch::requires_grad()));
  // As a TensorList: autograd counts a std::vector argument as one non-tensor.
  return Checkpointed::apply(at::TensorList(with_anchor), c10::make_intrusive<FnHolder>(fn));
}

}  // namespace lightning::nn
