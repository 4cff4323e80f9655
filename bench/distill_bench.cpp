#include "bench/distill_bench.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "bench/unet_bench.h"
#include "core/error.h"
#include "core/system.h"
#include "data/buckets.h"
#include "data/shards.h"
#include "data/stream.h"
#include "distill/memory.h"
#include "distill/recipe.h"
#include "distill/trainer.h"
#include "io/image_codecs.h"

namespace lightning::bench {
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

// Removes a temporary work directory when the bench ends, however it ends.
struct RemoveOnExit {
  std::string dir;
  ~RemoveOnExit() {
    std::error_code ec;
    if (!dir.empty()) fs::remove_all(dir, ec);
  }
};

// `count` random JPEG images with captions as one WebDataset shard: smooth colour fields with
// fine noise (so that they compress about as photos do), of the sizes in `sizes` in turn.
void write_shard(const std::string& path, int64_t first, int64_t count,
                 const std::vector<std::pair<int64_t, int64_t>>& sizes) {
  data::TarShardWriter tar(path);
  torch::manual_seed(first);
  for (int64_t i = first; i < first + count; ++i) {
    const auto [h, w] = sizes[static_cast<size_t>(i) % sizes.size()];
    const auto smooth = torch::nn::functional::interpolate(
        torch::rand({1, 3, 6, 6}), torch::nn::functional::InterpolateFuncOptions()
                                       .size(std::vector<int64_t>{h, w})
                                       .mode(torch::kBilinear)
                                       .align_corners(false));
    const auto image = (smooth + 0.05 * torch::randn({1, 3, h, w}))
                           .squeeze(0)
                           .mul(255)
                           .round()
                           .clamp(0, 255)
                           .to(torch::kUInt8);
    const auto key = fmt::format("{:06d}", i);
    tar.add(key + ".jpg", io::encode_jpeg(image, 90));
    tar.add(key + ".txt", fmt::format("a photo of object number {}", i));
  }
  tar.close();
}

// A temporary directory, removed when the bench ends; or `dir` as given, kept.
std::string work_directory(const std::string& dir, const char* what, RemoveOnExit* temporary) {
  std::string work = dir;
  if (work.empty()) {
    work = (fs::temp_directory_path() / fmt::format("lightning-{}-bench-{}", what, ::getpid()))
               .string();
    temporary->dir = work;
  }
  std::error_code ec;
  fs::create_directories(work, ec);
  if (ec) fail("{}: cannot create directory ({})", work, ec.message());
  return work;
}

}  // namespace

std::vector<DistillBenchRow> run_distill_bench(
    const DistillBenchOptions& options, const std::function<void(const std::string&)>& progress) {
  if (options.iterations < 1) fail_usage("--iterations must be >= 1, got {}", options.iterations);
  if (options.batch < 1) fail_usage("--batch must be >= 1, got {}", options.batch);
  auto recipe = distill::DistillRecipe::load(options.recipe);
  if (!options.stages.empty()) {
    std::vector<distill::StageRecipe> kept;
    int64_t previous = 0;
    for (const int64_t s : options.stages) {
      if (s < 1 || s > static_cast<int64_t>(recipe.stages.size()))
        fail_usage("--stages {}: {} has stages 1 to {}", s, options.recipe, recipe.stages.size());
      if (s <= previous)
        fail_usage("--stages: list stages once each, in increasing order ({} after {})", s,
                   previous);
      kept.push_back(recipe.stages[static_cast<size_t>(s - 1)]);
      previous = s;
    }
    recipe.stages = std::move(kept);
  }
  const bool preset = options.teacher == "sdxl" || options.teacher == "tiny-sdxl";
  if (!preset && !fs::is_directory(options.teacher))
    fail_usage("--distill {}: not a preset (sdxl, tiny-sdxl) or a model directory",
               options.teacher);
  const int64_t resolution =
      options.resolution > 0 ? options.resolution : (options.teacher == "sdxl" ? 256 : 64);

  if (preset) {  // refuse at once what cannot fit, from the shapes alone
    const auto shapes = random_pipeline(options.teacher, {torch::kFloat32, torch::kCPU, "", {}},
                                        /*vae_upcast=*/true, options.vocab, /*initialise=*/false);
    distill::check_discriminator_input(recipe, shapes, resolution);
    const auto memory = distill::check_phase_memory(recipe, shapes, torch::Device(options.device));
    if (memory.exceeds_with_swap())
      fail("bench --distill {}: {}; run it on a bigger machine (docs/benchmarks.md)",
           options.teacher, memory.describe());
    if (memory.exceeds())  // a dry run proves the chain: in swap it is slow, but it runs
      progress(
          fmt::format("largest phase: {}: it will run in this machine's {:.1f} GB of swap, "
                      "slowly",
                      memory.describe(), memory.swap / 1e9));
    else
      progress("largest phase: " + memory.describe());
  }

  RemoveOnExit temporary;
  const std::string work = work_directory(options.work_dir, "distill", &temporary);
  std::error_code ec;

  // The teacher: random full-size weights, stored in f16 as a released SDXL is.
  std::string teacher_dir = options.teacher;
  if (preset) {
    teacher_dir = (fs::path(work) / "teacher").string();
    const auto start = Clock::now();
    {
      auto model =
          random_pipeline(options.teacher, {torch::kFloat32, torch::kCPU, "", torch::kFloat16},
                          /*vae_upcast=*/true, options.vocab);
      generate::save_model(model, teacher_dir, torch::kFloat16);
    }
    progress(fmt::format("random {} teacher written to {} ({:.1f} s)", options.teacher, teacher_dir,
                         std::chrono::duration<double>(Clock::now() - start).count()));
  }

  // Data: two shards of small images, enough for a few batches per phase.
  const int64_t per_shard = std::max<int64_t>(8, options.batch * 2);
  for (int s = 0; s < 2; ++s)
    write_shard(fmt::format("{}/shard-{}.tar", work, s), s * per_shard, per_shard,
                {{resolution, resolution}});

  // The recipe's stages and [train] settings with a few iterations per phase; logs every
  // iteration, one sample image per stage, no checkpoints (tens of GB at full size).
  recipe.teacher = teacher_dir;
  recipe.dataset = "webdataset";
  recipe.data_dir.clear();
  recipe.source = {};
  recipe.source.shards = work + "/shard-{0..1}.tar";
  recipe.source.shuffle_buffer = 4;
  recipe.resolution = resolution;
  recipe.max_aspect = 1.0;
  recipe.batch_size = options.batch;
  recipe.log_every = 1;
  recipe.sample_every = 1 << 30;
  recipe.sample_per_class = 1;
  recipe.sample_prompts = {"a lighthouse at dawn"};
  if (!options.mixed_precision.empty()) recipe.mixed_precision = options.mixed_precision;
  for (auto& stage : recipe.stages)
    for (int64_t* n : {&stage.x0_warmup_iterations, &stage.mse_iterations,
                       &stage.conditional_iterations, &stage.unconditional_iterations,
                       &stage.full_iterations, &stage.discriminator_warmup_iterations})
      if (*n > 0) *n = options.iterations;

  distill::DistillOptions run;
  run.out_dir = (fs::path(work) / "run").string();
  fs::remove_all(run.out_dir, ec);
  run.device = torch::Device(options.device);
  run.checkpoints = false;
  // Each pipeline this bench wrote (the random teacher, the stages' models in the run
  // directory) goes once it is loaded as a teacher: at SDXL size the disk then holds one or two
  // pipelines (7 GB each in f16) instead of six. Never a --distill DIR, wherever it is.
  const auto run_dir = fs::weakly_canonical(run.out_dir);
  const auto random_teacher = preset ? fs::weakly_canonical(teacher_dir) : fs::path();
  run.teacher_loaded = [&](const std::string& dir, const generate::TextToImageModel&) {
    const auto path = fs::weakly_canonical(dir);
    const auto [end, _] = std::mismatch(run_dir.begin(), run_dir.end(), path.begin(), path.end());
    if (path != random_teacher && (end != run_dir.end() || path == run_dir)) return;
    std::error_code ec;
    fs::remove_all(path, ec);
    if (ec) spdlog::warn("bench: cannot remove {} ({})", path.string(), ec.message());
  };
  progress(fmt::format(
      "distilling: {} stage(s), {} iteration(s) per phase, {}x{}, batch {}, {}, mixed precision "
      "{}, gradient checkpointing {}, frozen weights in {}",
      recipe.stages.size(), options.iterations, resolution, resolution, options.batch,
      options.device, recipe.mixed_precision, recipe.gradient_checkpointing ? "on" : "off",
      recipe.frozen_weights_dtype));
  distill::run_distillation(recipe, run);

  // One row per phase from the metrics (a line per iteration).
  std::vector<DistillBenchRow> rows;
  std::vector<double> later;
  double previous_elapsed = 0;
  auto finish_row = [&] {
    if (rows.empty()) return;
    auto& row = rows.back();
    if (!later.empty()) {
      std::nth_element(later.begin(), later.begin() + static_cast<long>(later.size() / 2),
                       later.end());
      row.seconds = later[later.size() / 2];
    } else {  // one iteration: the first is all there is
      row.seconds = row.first_s;
      row.peak_memory_gb = row.first_peak_gb;
    }
    row.images_per_s = static_cast<double>(options.batch) / std::max(row.seconds, 1e-9);
    later.clear();
  };
  std::ifstream metrics(run.out_dir + "/metrics.jsonl");
  for (std::string text; std::getline(metrics, text);) {
    const auto line = nlohmann::json::parse(text);
    if (!line.contains("phase")) continue;
    const double elapsed = line.at("elapsed_s").get<double>();
    const double seconds = elapsed - previous_elapsed;
    previous_elapsed = elapsed;
    // The run's stage (1, 2, ... of the stages it ran), shown as the recipe numbers it.
    const int64_t run_stage = line.at("stage").get<int64_t>();
    const int64_t stage =
        options.stages.empty() ? run_stage : options.stages.at(static_cast<size_t>(run_stage - 1));
    const std::string phase = line.at("phase").get<std::string>();
    if (rows.empty() || rows.back().stage != stage || rows.back().phase != phase) {
      finish_row();
      DistillBenchRow row;
      row.stage = stage;
      row.stage_name = line.value("stage_name", "");
      row.phase = phase;
      row.first_s = seconds;
      row.first_peak_gb = line.value("peak_memory_gb", 0.0);
      rows.push_back(row);
    } else {
      later.push_back(seconds);
      // Each line's peak is its own iteration's (the bench logs every iteration).
      rows.back().peak_memory_gb =
          std::max(rows.back().peak_memory_gb, line.value("peak_memory_gb", 0.0));
    }
    rows.back().iterations += 1;
  }
  finish_row();
  if (rows.empty()) fail("{}/metrics.jsonl: no iteration was logged", run.out_dir);
  for (const auto& row : rows)
    progress(fmt::format(
        "stage {} ({}) {}: {:.2f} s per iteration, peak {:.2f} GB ({:.2f} GB "
        "in the first)",
        row.stage, row.stage_name, row.phase, row.seconds, row.peak_memory_gb, row.first_peak_gb));
  return rows;
}

std::string format_distill_table(const std::vector<DistillBenchRow>& rows) {
  std::string out =
      "| stage | phase | iterations | first iteration (s) | s / iteration | images/s | peak "
      "memory (GB) | first iteration's peak (GB) |\n|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : rows)
    out += fmt::format("| {} {} | {} | {} | {:.2f} | {:.2f} | {:.3f} | {:.2f} | {:.2f} |\n",
                       r.stage, r.stage_name, r.phase, r.iterations, r.first_s, r.seconds,
                       r.images_per_s, r.peak_memory_gb, r.first_peak_gb);
  return out;
}

DataBenchResult run_data_bench(const DataBenchOptions& options,
                               const std::function<void(const std::string&)>& progress) {
  if (options.batch < 1 || options.batches < 1 || options.warmup < 0)
    fail_usage("bench --data: --batch and --repeat must be >= 1, --warmup >= 0");
  RemoveOnExit temporary;
  data::DataSource source;
  source.shards = options.shards;
  source.shuffle_buffer = 16;
  if (options.shards == "synthetic") {
    const std::string work = work_directory("", "data", &temporary);
    const int64_t side = options.resolution * 5 / 4;
    const int64_t images = (options.warmup + options.batches + 3) * options.batch;
    write_shard(work + "/synthetic-0.tar", 0, images,
                {{side, side}, {side * 4 / 5, side * 6 / 5}, {side * 6 / 5, side * 4 / 5}});
    source.shards = work + "/synthetic-0.tar";
    progress(fmt::format("wrote {} JPEG images of about {}x{} to {}", images, side, side,
                         source.shards));
  }
  data::SampleStream stream(source);
  data::BatcherOptions batching;
  batching.batch_size = options.batch;
  batching.channels = 3;
  batching.buckets = data::make_buckets(
      options.resolution, data::bucket_step(0, options.resolution, 8), options.max_aspect);
  data::BucketBatcher batcher(stream, batching);
  for (int64_t i = 0; i < options.warmup; ++i)
    batcher.next();
  DataBenchResult result;
  const auto start = Clock::now();
  for (int64_t i = 0; i < options.batches; ++i)
    result.images += batcher.next().pixels.size(0);
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  result.images_per_s = static_cast<double>(result.images) / std::max(result.seconds, 1e-9);
  progress(fmt::format("{} images in {:.2f} s: {:.1f} images/s ({} skipped)", result.images,
                       result.seconds, result.images_per_s, stream.stats().skipped));
  return result;
}

}  // namespace lightning::bench
