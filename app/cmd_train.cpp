// `lightning train --recipe FILE`: trains a teacher model from a TOML recipe (see
// recipes/fmnist-teacher.toml and src/train/teacher.h for what a run directory holds).
#include <filesystem>
#include <optional>
#include <string>

#include "app/commands.h"
#include "core/error.h"
#include "core/system.h"
#include "eval/classifier.h"
#include "io/toml.h"
#include "train/teacher.h"

namespace lightning::app {
namespace {

struct TrainArgs {
  std::string recipe, out, vocab;
  bool resume = false;
  int64_t steps = 0, until = 0;
  int threads = 0;
};

}  // namespace

void add_train_command(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand(
      "train",
      "Train from a TOML recipe: a text-to-image teacher (writes metrics.jsonl, loss.png, sample "
      "grids, a resumable checkpoint/ and finally model/ into the run directory) or, with task = "
      "\"classifier\", the evaluation classifier.\n"
      "Examples: lightning train --recipe recipes/fmnist-teacher.toml --out runs/teacher\n"
      "          lightning train --recipe recipes/fmnist-teacher.toml --out runs/teacher --resume\n"
      "          lightning train --recipe recipes/fmnist-classifier.toml --out runs/classifier");
  cmd->add_option("--recipe", args->recipe, "TOML recipe")->required()->check(CLI::ExistingFile);
  cmd->add_option("--out", args->out, "Run directory (default: runs/<recipe name>)");
  cmd->add_flag("--resume", args->resume, "Continue the run in --out from its checkpoint");
  cmd->add_option("--steps", args->steps, "Total steps, overriding the recipe's")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--until", args->until,
                  "Stop after this step with a checkpoint (the schedule still runs to the total); "
                  "continue later with --resume")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--vocab", args->vocab,
                  "CLIP merges file the model's tokenizer is cut from (default: the shipped one)");
  add_threads_option(*cmd, &args->threads);
  cmd->callback([args] {
    set_threads(args->threads);
    const auto json = io::read_toml_file(args->recipe);
    if (json.is_object() && json.value("task", "") == "classifier") {
      auto recipe = eval::ClassifierRecipe::from_json(json, args->recipe);
      auto out =
          args->out.empty() ? (std::filesystem::path("runs") / recipe.name).string() : args->out;
      if (args->resume) fail_usage("--resume: classifier training is short and not resumable");
      auto model_dir = (std::filesystem::path(out) / "model").string();
      double accuracy = eval::train_classifier(recipe, model_dir);
      std::printf("%s\ttest accuracy %.4f\n", model_dir.c_str(), accuracy);
      return;
    }
    auto recipe = train::TeacherRecipe::from_json(json, args->recipe);
    train::TrainOptions options;
    options.out_dir =
        args->out.empty() ? (std::filesystem::path("runs") / recipe.name).string() : args->out;
    options.vocab = args->vocab.empty() ? shipped_vocab() : args->vocab;
    options.resume = args->resume;
    if (args->steps > 0) options.steps = args->steps;
    if (args->until > 0) options.until = args->until;
    auto model = train::train_teacher(recipe, options);
    if (!model.empty()) std::printf("%s\n", model.c_str());
  });
}

}  // namespace lightning::app
