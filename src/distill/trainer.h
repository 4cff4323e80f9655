// The stage trainer of progressive adversarial distillation (`lightning distill`). The recipe
// format is in distill/recipe.h, the objectives in distill/objectives.h, the data in
// distill/batches.h, a stage's networks and the updates of one iteration in distill/stage.h.
//
// One iteration of a stage (teacher K steps -> student K/n steps), batch B:
//   real x0 and captions from the train split; t drawn from the student's timestep grid;
//   x_t = student_input(x0, eps, t) (pure noise at t = T - 1);
//   the teacher's x_t' = n guided DDIM steps (frozen, no gradient);
//   the student's x_t' = one DDIM jump from its output;
//   mse / x0_warmup: an MSE update of the student;
//   conditional / unconditional: a discriminator update (real: the teacher's x_t', fake: the
//   student's), then a student update against the updated discriminator (non-saturating).
// The text encoder is the teacher's, frozen. The discriminator is re-initialised from the
// stage's teacher at each stage; each phase starts fresh Adam moments.
//
// A run directory holds: recipe.toml, metrics.jsonl, loss.png, samples/, checkpoint/ (replaced
// atomically; resuming gives the same next step as not stopping; at a stage's end it holds only
// the position, since the next stage starts from the stage's model) and per stage
// stage-<i>-<name>/model/ (a model directory `lightning generate` loads) and, for LoRA stages,
// stage-<i>-<name>/lora.safetensors (kohya format; `generate --lora` applies it to the stage's
// teacher).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "distill/recipe.h"

namespace lightning::dist {
class Group;
}

namespace lightning::generate {
struct TextToImageModel;
}

namespace lightning::distill {

struct DistillOptions {
  std::string out_dir;
  std::string models_root;  // where shipped model names are looked up
  bool resume = false;
  // Stops after this many iterations (over all stages) with a checkpoint: training in sessions.
  std::optional<int64_t> until;
  // Data-parallel training (dist/group.h); null: a single process. Every rank draws the same
  // global batch of `batch_size` and trains on its 1/size() share; gradients are averaged, so
  // N ranks follow the single-process run. Rank 0 writes every file.
  const dist::Group* group = nullptr;
  // Where the networks train (`--device`); data, noise and timesteps are drawn on the CPU (the
  // same numbers on any device) and moved. With several ranks: the group's device.
  torch::Device device = torch::kCPU;
  // false: no checkpoint/ is written (the dry-run benchmark, whose SDXL checkpoints would be
  // tens of GB); such a run cannot be resumed.
  bool checkpoints = true;
  // Called with each teacher's directory and model once it is loaded: the recipe's teacher,
  // then each finished stage's model as the next stage's teacher. The dry-run benchmark deletes
  // the directories there, so that its disk holds about one SDXL pipeline at a time instead of
  // six.
  std::function<void(const std::string& dir, const generate::TextToImageModel& teacher)>
      teacher_loaded;
};

struct DistillResult {
  std::vector<std::string> model_dirs;  // one per finished stage, in order
  bool interrupted =
      false;               // stopped by SIGINT or SIGTERM (after a checkpoint, unless they are off)
  int64_t iterations = 0;  // where training stopped
};

// Refuses (a usage error naming the recipe's stage and head_blocks) images whose smallest side,
// in pixels, is too small for the discriminator head of an adversarial stage from `first_stage`
// on: each head block halves the UNet encoder's features and needs at least 2x2 of them.
void check_discriminator_input(const DistillRecipe& recipe,
                               const generate::TextToImageModel& teacher, int64_t smallest_side,
                               size_t first_stage = 0);

// Checks the run directory and the recipe against the teacher before any training (usage
// errors name the flag or key), then trains. SIGINT or SIGTERM during training makes every rank
// stop at the same iteration: a checkpoint is written and it returns with `interrupted`.
DistillResult run_distillation(const DistillRecipe& recipe, const DistillOptions& options);

}  // namespace lightning::distill
