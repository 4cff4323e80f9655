// Pieces shared by the trainers (teacher, classifier, distillation): reproducible randomness per
// (seed, purpose, step), an endless epoch sampler, Adam moments in checkpoints, metric plots.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/optim/adam.h>
#include <torch/types.h>
#include <nlohmann/json.hpp>

#include "models/unet.h"

namespace lightning::dist {
class Group;
}

namespace lightning::train {

// A recipe's [log] table: how often to log metrics, write sample grids and checkpoints.
struct LogIntervals {
  int64_t log_every = 25, sample_every = 500, checkpoint_every = 500;
};
// Reads log_every, sample_every and checkpoint_every (each >= 1) from `section` over `defaults`;
// unknown keys are refused. `where` names the table in errors ("recipe.toml [log]").
LogIntervals read_log_section(const nlohmann::json& section, const std::string& where,
                              LogIntervals defaults);

// Deterministic randomness per (seed, purpose, index): resuming at step s redraws exactly what
// an uninterrupted run would have drawn, without saving generator states.
uint64_t mix_seed(uint64_t seed, uint64_t purpose, uint64_t index);
at::Generator torch_generator(uint64_t seed);

// Positions step*B .. step*B+B-1 of the endless sequence of per-epoch permutations of [0, n).
class EpochSampler {
 public:
  EpochSampler(int64_t n, uint64_t seed) : n_(n), seed_(seed) {}
  torch::Tensor batch(int64_t step, int64_t batch_size);

 private:
  int64_t n_;
  uint64_t seed_;
  int64_t epoch_ = -1;
  torch::Tensor perm_;
};

// The module's parameters as (prefix + name, tensor).
std::vector<std::pair<std::string, torch::Tensor>> named_params(const torch::nn::Module& module,
                                                                const std::string& prefix);

// Exponential moving averages: ema = decay * ema + (1 - decay) * source, tensor by tensor (same
// order and shapes), without gradients. ema_decay_at: diffusers' warm-up of the decay,
// min(decay, (1 + step) / (10 + step)).
void ema_update(const std::vector<torch::Tensor>& ema, const std::vector<torch::Tensor>& source,
                double decay);
double ema_decay_at(double decay, int64_t step);

// Adam/AdamW moments of `params` as tensors "<name>.exp_avg" / "<name>.exp_avg_sq" (parameters
// without state yet are skipped), and back. `step` is restored into every state.
std::vector<std::pair<std::string, torch::Tensor>> adam_state_tensors(
    torch::optim::Optimizer& optimizer,
    const std::vector<std::pair<std::string, torch::Tensor>>& params);
void restore_adam_state(torch::optim::Optimizer& optimizer,
                        const std::vector<std::pair<std::string, torch::Tensor>>& params,
                        const std::string& file, int64_t step, bool adamw);

// Copies the recipe file into the run directory as recipe.toml (atomically).
void keep_recipe_copy(const std::string& recipe_file, const std::string& out_dir);

// Resuming: drops the lines of a metrics.jsonl written after `step` (they belong to the
// interrupted run), rewrites the file atomically and returns the kept lines parsed.
std::vector<nlohmann::json> truncate_metrics(const std::string& path, int64_t step);

// Loads a checkpoint's safetensors file into `module` strictly and gives every parameter its own
// storage (load_weights may leave views of the memory-mapped file): ready to train.
void load_trainable_weights(torch::nn::Module& module, const std::string& file,
                            torch::Device device = torch::kCPU);

// A metric curve for a plot: (step, value) points.
struct Curve {
  std::string name;
  std::vector<double> x, y;
};
// Writes a PNG line plot of the curves (each with a moving average of `smooth` points drawn over
// it when > 1), log y axis when `log_y`.
void write_curves_png(const std::vector<Curve>& curves, const std::string& path,
                      const std::string& title, const std::string& y_label, bool log_y,
                      size_t smooth = 10);

// A UNet that holds no weights of its own: every parameter and buffer is the same tensor as
// `base`'s (frozen: requires_grad off). A LoRA student trains adapters on top of the frozen
// teacher without a second copy of its weights. Built without initialising, so the UNet's own
// fresh tensors are never touched (never resident) before they are dropped.
models::UNet2DConditionModel unet_sharing_weights(const models::UNet2DConditionModel& base);
// Gives every parameter and buffer of `module` its own storage (a copy): a sharing UNet before
// its weights may change. With `dtype`, the floating-point parameters are copied in it (a
// student of half-precision frozen weights trains in float32).
void own_weights(torch::nn::Module& module, std::optional<torch::ScalarType> dtype = std::nullopt);

// ZeRO stage 1 ([train] shard_optimizer of a distillation recipe): every rank keeps the full
// weights and the averaged gradients but Adam's moments only for its share of the parameters,
// updates that share and broadcasts it. Shares are balanced by element count (largest first),
// alike on every rank. Checkpoints gather the moments into the unsharded file format, so a run
// may resume either way.
class OptimizerShards {
 public:
  OptimizerShards(const std::vector<torch::Tensor>& params, int ranks);
  // The named parameters rank `rank` updates.
  std::vector<std::pair<std::string, torch::Tensor>> mine(
      const std::vector<std::pair<std::string, torch::Tensor>>& named, int rank) const;
  // After the ranks' steps: every parameter takes its owner's values (one flat broadcast per
  // rank).
  void sync(const std::vector<torch::Tensor>& params, const dist::Group& group) const;
  // Every parameter's moments (as adam_state_tensors names them), from their owners; complete
  // on rank 0 (the one that writes them).
  std::vector<std::pair<std::string, torch::Tensor>> gather_state(
      torch::optim::Optimizer& optimizer,
      const std::vector<std::pair<std::string, torch::Tensor>>& named,
      const dist::Group& group) const;

 private:
  std::vector<int> owner_;
  int ranks_;
};

}  // namespace lightning::train
