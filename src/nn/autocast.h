// libtorch's autocast (mixed precision) state on the CPU and CUDA, and a scope that puts a state
// in force: the trainer's bf16 forward passes and the recomputation of checkpointed blocks
// (nn/checkpoint.h), which must run under the state their forward pass ran under.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/version.h>

namespace lightning::nn {

struct AutocastState {
  bool cpu = false, cuda = false;
  at::ScalarType cpu_dtype = at::kBFloat16, cuda_dtype = at::kHalf;

  // bf16 autocast on both devices (the paper's bf16 mixed precision).
  static AutocastState bf16() { return {true, true, at::kBFloat16, at::kBFloat16}; }
  // A recipe's mixed precision: bf16() when `bf16`, else the state already in force.
  static AutocastState bf16_or_current(bool bf16) {
    return bf16 ? AutocastState::bf16() : current();
  }
  bool enabled() const { return cpu || cuda; }

// libtorch 2.4 replaced the per-device autocast functions by ones taking the device type.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  static AutocastState current() {
    return {
        at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
        at::autocast::get_autocast_dtype(at::kCPU), at::autocast::get_autocast_dtype(at::kCUDA)};
  }
  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }
#else
  static AutocastState current() {
    return {at::autocast::is_cpu_enabled(), at::autocast::is_enabled(),
            at::autocast::get_autocast_cpu_dtype(), at::autocast::get_autocast_gpu_dtype()};
  }
  void apply() const {
    at::autocast::set_cpu_enabled(cpu);
    at::autocast::set_enabled(cuda);
    at::autocast::set_autocast_cpu_dtype(cpu_dtype);
    at::autocast::set_autocast_gpu_dtype(cuda_dtype);
  }
#endif
};

// While alive, `state` is in force (the matrix products and convolutions of forward passes run
// in its dtype; weights and gradients keep theirs). Nests: autocast's cache of weight casts is
// cleared when the outermost enabled scope ends. The previous state is restored on exit.
class AutocastScope {
 public:
  explicit AutocastScope(const AutocastState& state)
      : previous_(AutocastState::current()), counted_(state.enabled()) {
    state.apply();
    if (counted_) at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (counted_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    previous_.apply();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  AutocastState previous_;
  bool counted_;
};

}  // namespace lightning::nn
