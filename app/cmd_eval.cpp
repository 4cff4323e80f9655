// `lightning eval`: FID, FID-patch and prompt accuracy of a Fashion-MNIST model in the feature
// space of the project's classifier (src/eval/evaluate.h), for a grid of samplers, step counts
// and guidance scales; prints a Markdown table and writes JSON lines.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "app/commands.h"
#include "app/device.h"
#include "core/error.h"
#include "core/system.h"
#include "data/fashion_mnist.h"
#include "eval/evaluate.h"
#include "io/image.h"
#include "io/json_config.h"

namespace lightning::app {
namespace {
namespace fs = std::filesystem;

struct EvalArgs {
  std::string model = "fmnist-teacher", classifier = "fmnist-classifier";
  std::vector<int64_t> steps;
  std::vector<std::string> samplers;
  std::vector<double> guidance;
  eval::EvalOptions options;
  bool floor = false, no_model = false, accuracy = false;
  std::string out, grid;
  int threads = 0;
};

std::string row_markdown(const eval::EvalRow& r) {
  if (r.what == "train split")
    return fmt::format("| train split (floor) | - | - | {} | {:.3f} | {:.3f} | {:.1f}% | - |",
                       r.images, r.fid, r.fid_patch, r.prompt_accuracy * 100);
  return fmt::format("| {} | {} | {:g} | {} | {:.3f} | {:.3f} | {:.1f}% | {:.0f} |", r.what,
                     r.steps, r.guidance, r.images, r.fid, r.fid_patch, r.prompt_accuracy * 100,
                     r.seconds);
}

void run_eval(const EvalArgs& a) {
  set_threads(a.threads);
  if (!a.out.empty()) {
    auto parent = fs::path(a.out).parent_path();
    if (!parent.empty() && !fs::is_directory(parent))
      fail_usage("--out {}: the directory does not exist", a.out);
  }
  auto options = a.options;
  const auto models_root = shipped_models_root();
  auto classifier = eval::load_classifier(generate::resolve_model_dir(a.classifier, models_root));
  if (a.accuracy) {
    double acc = eval::test_accuracy(classifier, options.data_dir.empty()
                                                     ? std::string(data::kFashionMnistDir)
                                                     : options.data_dir);
    std::printf("classifier test accuracy: %.2f%%\n", acc * 100);
    return;
  }
  const auto reference = eval::reference_stats(classifier, options);
  std::vector<eval::EvalRow> rows;
  std::printf(
      "| sampler | steps | guidance | images | FID | FID-patch | prompt accuracy | seconds |\n"
      "|---|---|---|---|---|---|---|---|\n");
  std::fflush(stdout);
  auto emit = [&](const eval::EvalRow& row) {
    rows.push_back(row);
    std::printf("%s\n", row_markdown(row).c_str());
    std::fflush(stdout);
    if (!a.out.empty()) {
      std::string text;
      for (const auto& r : rows)
        text += r.to_json().dump() + "\n";
      io::write_file_atomic(a.out, text);
    }
  };
  if (a.floor) emit(eval::evaluate_floor(classifier, reference, options));
  if (a.no_model) return;

  const auto model = generate::load_model(generate::resolve_model_dir(a.model, models_root), {});
  std::vector<int64_t> steps =
      a.steps.empty() ? std::vector<int64_t>{model.recommended.steps} : a.steps;
  std::vector<double> guidance =
      a.guidance.empty() ? std::vector<double>{model.recommended.guidance_scale} : a.guidance;
  std::vector<diffusion::SamplerKind> samplers;
  for (const auto& s : a.samplers)
    samplers.push_back(diffusion::parse_sampler_kind(s));
  if (samplers.empty()) samplers.push_back(model.recommended.sampler);
  bool grid_written = a.grid.empty();
  for (auto sampler : samplers)
    for (auto g : guidance)
      for (auto n : steps) {
        torch::Tensor images;
        emit(eval::evaluate_model(model, classifier, reference, sampler, n, g, options,
                                  grid_written ? nullptr : &images));
        if (!grid_written) {  // the first setting's first 100 images: a column per class
          auto first = images.slice(0, 0, std::min<int64_t>(100, images.size(0)));
          io::write_png(
              a.grid, io::make_grid(io::to_uint8_image(first), 10, 2, 255),
              {{"parameters", fmt::format("{} {} steps, CFG {:g}, seeds {}.., columns: "
                                          "the 10 classes",
                                          diffusion::to_string(sampler), n, g, options.seed)}});
          grid_written = true;
        }
      }
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto args = std::make_shared<EvalArgs>();
  auto* cmd = app.add_subcommand(
      "eval",
      "Evaluate a Fashion-MNIST text-to-image model with the project's classifier: FID (its "
      "feature space, against the test split), FID-patch (random crops, detail) and prompt "
      "accuracy, for every combination of --sampler, --guidance and --steps.\n"
      "Examples: lightning eval --steps 4,8,16 --sampler euler,ddim --guidance 1,3 --num-images "
      "5000\n"
      "          lightning eval --floor --no-model --num-images 5000\n"
      "          lightning eval --classifier-accuracy");
  cmd->add_option("--model", args->model, "Model directory or shipped name")->capture_default_str();
  cmd->add_option("--classifier", args->classifier, "Classifier directory or shipped name")
      ->capture_default_str();
  cmd->add_option("--steps", args->steps, "Step counts (default: the model's)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber);
  cmd->add_option("--sampler", args->samplers, "Samplers: euler, ddim (default: the model's)")
      ->delimiter(',')
      ->check(CLI::IsMember({"euler", "ddim"}));
  cmd->add_option("--guidance", args->guidance, "Guidance scales (default: the model's)")
      ->delimiter(',')
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--num-images", args->options.num_images, "Images per setting")
      ->check(CLI::Range(int64_t{2}, int64_t{1000000}))
      ->capture_default_str();
  cmd->add_option("--seed", args->options.seed, "Seed of the first image")->capture_default_str();
  cmd->add_option("--batch", args->options.batch, "Images per generation batch")
      ->check(CLI::Range(int64_t{1}, int64_t{100000}))
      ->capture_default_str();
  cmd->add_option("--crop", args->options.crop, "FID-patch crop size")
      ->check(CLI::Range(int64_t{1}, int64_t{32}))
      ->capture_default_str();
  cmd->add_option("--data-dir", args->options.data_dir, "Fashion-MNIST directory");
  cmd->add_flag("--floor", args->floor, "Also score N train-split images (the floor)");
  cmd->add_flag("--no-model", args->no_model, "Do not evaluate a model (with --floor)");
  cmd->add_flag("--classifier-accuracy", args->accuracy, "Print the classifier's test accuracy");
  cmd->add_option("--out", args->out, "Write the rows as JSON lines to this file");
  cmd->add_option("--grid", args->grid, "Write a PNG grid of the first setting's first 100 images");
  add_threads_option(*cmd, &args->threads);
  cmd->callback([args] { run_eval(*args); });
}

}  // namespace lightning::app
