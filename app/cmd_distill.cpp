// `lightning distill --recipe FILE`: progressive adversarial distillation of a model into a
// chain of few-step students (see recipes/fmnist-lightning.toml, src/distill/recipe.h and
// src/distill/trainer.h for the recipe and what a run directory holds).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "app/commands.h"
#include "core/error.h"
#include "core/system.h"
#include "distill/trainer.h"

namespace lightning::app {
namespace {

struct DistillArgs {
  std::string recipe, out;
  bool resume = false;
  int64_t until = 0;
  int threads = 0;
};

}  // namespace

void add_distill_command(CLI::App& app) {
  auto args = std::make_shared<DistillArgs>();
  auto* cmd = app.add_subcommand(
      "distill",
      "Distil a model into few-step students, stage by stage (MSE and adversarial stages, LoRA or "
      "full UNet, the 1-step x0 switch). Writes per stage a model directory and (LoRA stages) a "
      "kohya LoRA file, plus metrics.jsonl, loss.png, sample grids and a resumable checkpoint/.\n"
      "Examples: lightning distill --recipe recipes/fmnist-lightning.toml --out runs/lightning\n"
      "          lightning distill --recipe recipes/fmnist-lightning.toml --out runs/lightning "
      "--resume\n"
      "Ctrl-C writes a checkpoint and exits (status 130); --resume continues exactly.");
  cmd->add_option("--recipe", args->recipe, "TOML recipe")->required()->check(CLI::ExistingFile);
  cmd->add_option("--out", args->out, "Run directory (default: runs/<recipe file name>)");
  cmd->add_flag("--resume", args->resume, "Continue the run in --out from its checkpoint");
  cmd->add_option("--until", args->until,
                  "Stop after this many iterations (all stages counted) with a checkpoint; "
                  "continue later with --resume")
      ->check(CLI::PositiveNumber);
  add_threads_option(*cmd, &args->threads);
  cmd->callback([args] {
    set_threads(args->threads);
    const auto recipe = distill::DistillRecipe::load(args->recipe);
    distill::DistillOptions options;
    options.out_dir =
        args->out.empty()
            ? (std::filesystem::path("runs") / std::filesystem::path(args->recipe).stem()).string()
            : args->out;
    options.models_root = shipped_models_root();
    options.resume = args->resume;
    if (args->until > 0) options.until = args->until;
    const auto result = distill::run_distillation(recipe, options);
    for (const auto& dir : result.model_dirs)
      std::printf("%s\n", dir.c_str());
    std::fflush(stdout);
    if (result.interrupted) std::exit(130);
  });
}

}  // namespace lightning::app
