// `lightning bench`: UNet forward speed, memory and GFLOP/s; VAE decodes; text-to-image end to
// end; a distillation dry run (not tests; see docs/benchmarks.md).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "app/commands.h"
#include "app/device.h"
#include "bench/distill_bench.h"
#include "bench/unet_bench.h"
#include "core/error.h"
#include "core/log.h"
#include "core/system.h"

namespace lightning::app {
namespace {
struct BenchArgs {
  bench::UNetBenchOptions options;
  int threads = 0;
  std::string save_random;
  std::string weights_dtype;  // --save-random: f16 by default; --pipeline: the --dtype
  bench::DistillBenchOptions distill;
  std::string data;  // --data
};
}  // namespace

void add_bench_command(CLI::App& app) {
  auto args = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand(
      "bench",
      "Benchmark UNet forwards: seconds, peak RSS, GFLOP/s next to a GEMM peak.\n"
      "Examples: lightning bench                       (tiny SDXL-shaped UNet, seconds)\n"
      "          lightning bench --unet sdxl --latent 64,128 --dtype f32,bf16 --repeat 1\n"
      "          lightning bench --unet sdxl --save-random /tmp/sdxl-f16 --weights-dtype f16\n"
      "          lightning bench --model /tmp/sdxl-f16 --dtype f32 --latent 32\n"
      "          lightning bench --vae sdxl --image 512,1024 --dtype f32 [--vae-tile 512]\n"
      "          lightning bench --pipeline sdxl --image 1024 --steps 4 --device cuda --dtype f16\n"
      "          lightning bench --distill sdxl --image 256 --iterations 1   (needs ~75 GB)\n"
      "          lightning bench --data synthetic --image 1024 --batch 8 --repeat 5");
  auto& o = args->options;
  cmd->add_option("--unet", o.presets, "UNet presets: tiny-sdxl, tiny-sd15, sd15, sdxl")
      ->delimiter(',')
      ->check(CLI::IsMember({"tiny-sdxl", "tiny-sd15", "sd15", "sdxl"}))
      ->capture_default_str();
  cmd->add_option("--dtype", o.dtypes, "Compute types: f32, bf16, f16 (CUDA)")
      ->delimiter(',')
      ->check(CLI::IsMember({"f32", "bf16", "f16"}))
      ->capture_default_str();
  cmd->add_option("--latent", o.latents,
                  "Latent sizes (default: 64,128 for sdxl/sd15, 32 for tiny presets)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber);
  cmd->add_option("--batch", o.batch, "Batch size")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--warmup", o.warmup, "Untimed forwards first")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--repeat", o.repeat, "Timed forwards (median reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_flag("!--no-gemm", o.gemm, "Skip the GEMM peak reference");
  cmd->add_flag("--train-step", o.train_step,
                "UNet bench: time LoRA training steps (forward + backward) instead of forwards, "
                "without and with gradient checkpointing");
  cmd->add_option("--lora-rank", o.lora_rank, "--train-step: the LoRA's rank")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--vae", o.vae_presets,
                  "Benchmark VAE decodes instead of UNet forwards: sdxl, tiny")
      ->delimiter(',')
      ->check(CLI::IsMember({"sdxl", "tiny"}));
  cmd->add_option("--image", o.images, "VAE bench image sizes (default 512,1024 for sdxl)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber);
  cmd->add_option("--vae-tile", o.vae_tile,
                  "VAE and pipeline benches: decode in tiles of this many pixels")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--pipeline", o.pipeline,
                  "Benchmark text-to-image end to end: a random-weight preset (sdxl, tiny-sdxl), "
                  "a model directory or a single-file checkpoint");
  cmd->add_option("--steps", o.steps, "Pipeline bench: Euler steps (trailing spacing)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--guidance", o.guidance, "Pipeline bench: CFG scale (<= 1: off)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_flag("!--no-vae-upcast", o.vae_upcast,
                "Pipeline bench presets: run the VAE in f16 too (as an fp16-fix VAE does)");
  cmd->add_option("--device", o.device, "cpu or cuda[:N]")->capture_default_str();
  cmd->add_option("--model", o.model_dir,
                  "Benchmark this model directory (load time and RSS, then forwards)");
  cmd->add_option(
      "--save-random", args->save_random,
      "Write a random-weight UNet of the first --unet preset to this directory, then exit");
  cmd->add_option("--weights-dtype", args->weights_dtype,
                  "--save-random: the stored dtype (default f16); --pipeline: hold the weights in "
                  "this dtype while computing in --dtype (default: the --dtype)")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  auto& d = args->distill;
  cmd->add_option("--distill", d.teacher,
                  "Dry-run a distillation recipe (every stage and phase, a few iterations each) "
                  "on a random-weight preset (sdxl, tiny-sdxl) or a model directory: seconds "
                  "per iteration and peak memory of every phase");
  cmd->add_option("--recipe", d.recipe,
                  "--distill: the recipe (default: recipes/sdxl-lightning.toml)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--stages", d.stages,
                  "--distill: only these stages of the recipe, numbered from 1 (2 or 2,5; "
                  "default: all)")
      ->delimiter(',');
  cmd->add_option("--iterations", d.iterations, "--distill: iterations per phase")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--data", args->data,
                  "Time one reader thread turning WebDataset shards (a brace pattern, or "
                  "'synthetic' for generated JPEGs) into batches of --batch images in "
                  "aspect-ratio buckets of about --image² pixels (default 1024): images/s");
  cmd->add_option("--mixed-precision", d.mixed_precision,
                  "--distill: no or bf16 (default: the recipe's [train] mixed_precision)")
      ->check(CLI::IsMember({"no", "bf16"}));
  cmd->add_option("--work-dir", d.work_dir,
                  "--distill: keep the teacher, data and run here (default: a temporary "
                  "directory, removed)");
  add_threads_option(*cmd, &args->threads);
  cmd->callback([args, cmd] {
    const auto& pipeline = args->options.pipeline;
    std::vector<std::string> chosen;  // the benchmarks asked for: one at most
    for (const char* flag : {"--unet", "--model", "--vae", "--pipeline", "--distill", "--data"})
      if (cmd->get_option(flag)->count() > 0) chosen.push_back(flag);
    if (chosen.size() > 1) fail_usage("{} and {}: choose one benchmark", chosen[0], chosen[1]);
    if (!pipeline.empty() && pipeline != "sdxl" && pipeline != "tiny-sdxl" &&
        !std::filesystem::exists(pipeline))
      fail_usage("--pipeline {}: not a preset (sdxl, tiny-sdxl), model directory or file",
                 pipeline);
    set_threads(args->threads);
    spdlog::info("bench: {} threads", at::get_num_threads());
    const auto progress = [](const std::string& line) { spdlog::info("{}", line); };
    // --data and --distill take one --image size (else their default).
    auto one_image = [&](const char* bench, int64_t fallback) {
      const auto& images = args->options.images;
      if (images.size() > 1) fail_usage("{}: give one --image size, not {}", bench, images.size());
      return images.empty() ? fallback : images[0];
    };
    if (!args->data.empty()) {
      bench::DataBenchOptions data;
      data.shards = args->data;
      data.resolution = one_image("--data", data.resolution);
      data.batch = args->options.batch;
      data.warmup = args->options.warmup;
      data.batches = args->options.repeat;
      const auto result = bench::run_data_bench(data, progress);
      std::printf(
          "| data | image size | batch | images | seconds | images/s |\n|---|---|---|---|---|---|\n"
          "| %s | %lld | %lld | %lld | %.2f | %.1f |\n",
          args->data.c_str(), static_cast<long long>(data.resolution),
          static_cast<long long>(data.batch), static_cast<long long>(result.images), result.seconds,
          result.images_per_s);
      return;
    }
    if (!args->distill.teacher.empty()) {
      auto d = args->distill;
      d.resolution = one_image("--distill", d.resolution);
      if (d.recipe.empty()) d.recipe = shipped_recipe("sdxl-lightning.toml");
      d.batch = args->options.batch;
      d.device = parse_device(args->options.device).str();
      d.vocab = shipped_vocab();
      const auto rows = bench::run_distill_bench(d, progress);
      std::fputs(bench::format_distill_table(rows).c_str(), stdout);
      return;
    }
    const auto& dtypes = args->options.dtypes;
    const bool cpu = parse_device(args->options.device).is_cpu();
    if (cpu && std::find(dtypes.begin(), dtypes.end(), "f16") != dtypes.end())
      fail_usage("--dtype f16: libtorch has no f16 convolution/matmul on CPU; use bf16 or f32");
    if (cpu && !cpu_has_avx512_bf16() &&
        std::find(dtypes.begin(), dtypes.end(), "bf16") != dtypes.end())
      spdlog::info(
          "bench: this CPU has no AVX512-BF16; bf16 rows run libtorch's slow reference kernels");
    if (!args->save_random.empty()) {
      bench::save_random_unet(args->options.presets.at(0),
                              args->weights_dtype.empty() ? "f16" : args->weights_dtype,
                              args->save_random);
      spdlog::info("wrote {}", args->save_random);
      return;
    }
    std::vector<bench::BenchRow> rows;
    if (!args->options.pipeline.empty()) {
      args->options.vocab = shipped_vocab();
      args->options.weights_dtype = args->weights_dtype;
      rows = bench::run_pipeline_bench(args->options, progress);
    } else if (!args->options.vae_presets.empty()) {
      rows = bench::run_vae_bench(args->options, progress);
    } else {
      rows = bench::run_unet_bench(args->options, progress);
    }
    std::fputs(bench::format_bench_table(rows).c_str(), stdout);
  });
}

}  // namespace lightning::app
