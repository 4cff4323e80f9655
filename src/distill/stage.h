// One stage of a distillation run (distill/trainer.h describes the iteration): its networks,
// and the training of one of its phases.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/optim/adam.h>
#include <torch/types.h>

#include "diffusion/noise_schedule.h"
#include "distill/batches.h"
#include "distill/objectives.h"
#include "distill/recipe.h"
#include "generate/pipeline.h"
#include "models/discriminator.h"
#include "models/unet.h"
#include "train/train_util.h"

namespace lightning::dist {
class Group;
}

namespace lightning::distill {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// A stage's networks: the frozen teacher, the student and, in stages with adversarial phases,
// the discriminator (a copy of the teacher's UNet encoder, with heads). Their forward passes run
// in bf16 under the recipe's mixed precision, with float32 outputs.
class StageNetworks {
 public:
  // The student is a copy of the teacher, or, where the stage's training starts (`first_phase`)
  // with LoRA, a UNet sharing the teacher's frozen weights (no second copy) until its full phase.
  StageNetworks(const DistillRecipe& recipe, size_t stage, size_t first_phase,
                generate::TextToImageModel& teacher, const torch::Device& device);

  // Resuming inside the stage: the trained weights and adapters of checkpoint `dir`.
  void load_checkpoint(const std::filesystem::path& dir, const torch::Device& device);
  // LoRA on or off for `phase`. A LoRA phase freezes the base weights and attaches adapters
  // (once); a full phase after LoRA phases merges them and trains every weight.
  void begin_phase(const Phase& phase);
  // The stage's training is over: the student's gradients and the discriminator go, adapters
  // still attached are merged as by begin_phase.
  void end_training();
  // Whether adapters are attached (not merged yet): save them before the phase that merges them.
  bool lora_attached() const { return lora_attached_; }
  // The attached adapters in kohya's format (`generate --lora`), to `kohya_path`.
  void save_lora(const std::string& kohya_path);

  // The phase's trainable parameters: the adapters in LoRA phases, else the student's weights.
  NamedTensors student_parameters(const Phase& phase);
  NamedTensors discriminator_parameters();
  // The trainable state a checkpoint holds: the base weights, the adapters (when attached) and
  // the discriminator's weights, written into directory `dir`.
  void save_checkpoint(const std::string& dir);

  // The student as a model that `generate` runs (samples) and `save_model` saves: the teacher's
  // pipeline with the student's UNet, prediction type and step count.
  generate::TextToImageModel student_model() const;

  // Forward passes.
  torch::Tensor student_output(const torch::Tensor& x, const torch::Tensor& t,
                               const Conditioning& c);
  ConditionedModel teacher_model();
  torch::Tensor discriminator_features(const torch::Tensor& x, const torch::Tensor& t,
                                       const Conditioning& c);
  // The discriminator's logits for x at t: conditional on the features of x_t (`features_t`),
  // or unconditional.
  torch::Tensor discriminator_logits(const torch::Tensor& x, const torch::Tensor& t,
                                     const Conditioning& c, const torch::Tensor& features_t,
                                     bool conditional);

  diffusion::PredictionType teacher_prediction_type() const {
    return teacher_.scheduler.prediction_type;
  }
  models::UNet2DConditionModel& student() { return student_; }

 private:
  void merge_lora();

  const DistillRecipe& recipe_;
  const StageRecipe& stage_;
  size_t stage_index_;
  generate::TextToImageModel& teacher_;
  bool bf16_;
  models::UNet2DConditionModel student_{nullptr};
  models::Discriminator disc_{nullptr};
  bool lora_attached_ = false;
  bool shares_teacher_ = false;  // the student's base weights are the teacher's tensors
};

// One phase's training: its trainable parameters, their optimisers (fresh Adam moments each
// phase, or this rank's share of them when sharded over the ranks) and the student's average.
class PhaseTrainer {
 public:
  // Gives every rank the same starting point (rank 0's) and makes the optimisers. Resuming at
  // iteration `resume_at` > 0 of the phase reads the moments and averages from `checkpoint_dir`.
  PhaseTrainer(const DistillRecipe& recipe, size_t stage, size_t phase, StageNetworks& networks,
               const diffusion::NoiseSchedule& schedule, const dist::Group& group,
               const RankRows& rows, const std::filesystem::path& checkpoint_dir,
               int64_t resume_at);
  PhaseTrainer(const PhaseTrainer&) = delete;
  PhaseTrainer& operator=(const PhaseTrainer&) = delete;

  double learning_rate() const { return lr_; }
  // The phase's `i`-th iteration on `batch` (noise and timesteps from `generator`): the updates
  // and this rank's metrics.
  std::map<std::string, double> step(const TrainingBatch& batch, const Conditioning& uncond,
                                     at::Generator& generator, int64_t i);
  // After each step: the student's average moves towards its weights (ema_decay > 0).
  void update_average();
  // At the phase's end: the student takes its average.
  void hand_on_average();
  // The optimisers' moments (from their owners, when sharded: a collective) and the averages,
  // as a checkpoint names them. Complete on rank 0.
  struct State {
    NamedTensors student_adam, discriminator_adam, average;
  };
  State gather_state();

 private:
  // Backpropagates `loss` into the student and updates it (gradients averaged over the ranks).
  void update_student(const torch::Tensor& loss, std::map<std::string, double>& m);
  // One MSE update of the student (the mse and x0_warmup objectives).
  void mse_update(const torch::Tensor& prediction, const torch::Tensor& target,
                  std::map<std::string, double>& m);
  // The discriminator's updates (real: the teacher's x_t', fake: the student's), then the
  // student's against the updated discriminator (non-saturating), outside warm-ups.
  void adversarial_updates(const torch::Tensor& x_t, const torch::Tensor& t,
                           const torch::Tensor& t_prev, const torch::Tensor& target,
                           const torch::Tensor& x_prev, const Conditioning& context,
                           at::Generator& generator, int64_t i, std::map<std::string, double>& m);

  const DistillRecipe& recipe_;
  const StageRecipe& stage_;
  Phase phase_;
  StageNetworks& nets_;
  const diffusion::NoiseSchedule& schedule_;
  const dist::Group& group_;
  const RankRows& rows_;
  std::vector<int64_t> grid_;  // the student's timesteps
  torch::Tensor grid_tensor_;
  // The student's adversarial iterations (those of the re-noising weights' switch): in all, and
  // those of this stage before this phase.
  int64_t adversarial_total_ = 0, adversarial_before_ = 0;
  double lr_ = 0;
  NamedTensors student_named_, disc_named_;
  std::vector<torch::Tensor> student_params_, disc_params_;
  std::optional<train::OptimizerShards> g_shards_, d_shards_;
  NamedTensors g_opt_named_, d_opt_named_;  // the parameters this rank's optimisers update
  std::unique_ptr<torch::optim::Adam> g_opt_, d_opt_;
  std::vector<torch::Tensor> average_;  // in the order of student_params_
};

}  // namespace lightning::distill
