// `lightning generate`: text-to-image with a model directory or a shipped model (DESIGN.md
// contract). Every PNG carries an A1111-style "parameters" text chunk that reproduces it.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "app/commands.h"
#include "app/device.h"
#include "core/error.h"
#include "core/progress.h"
#include "core/system.h"
#include "generate/pipeline.h"
#include "io/image.h"

namespace lightning::app {
namespace {
namespace fs = std::filesystem;

struct GenerateArgs {
  std::string model = "fmnist-lightning-4step";
  std::string prompt, negative_prompt;
  std::optional<int64_t> steps;
  std::optional<double> guidance;
  std::string sampler, spacing, prediction;
  std::optional<uint64_t> seed;
  int64_t batch = 1, height = 0, width = 0;
  std::string out, out_dir;
  std::string dtype = "f32", device = "cpu", weights_dtype;
  int threads = 0;
  std::vector<std::string> loras;
  bool lora_allow_partial = false;
  std::string preset, unet, config;
  bool vae_tiling = false;
  int64_t vae_tile_size = 512;
  std::string control, control_model;
  double control_scale = 1.0;
};

// Refuses an output location that cannot be written before any work is done.
void check_writable_dir(const fs::path& dir, const std::string& flag) {
  if (!fs::is_directory(dir)) fail_usage("{} {}: the directory does not exist", flag, dir.string());
  if (::access(dir.c_str(), W_OK) != 0)
    fail_usage("{} {}: the directory is not writable", flag, dir.string());
}

void run_generate(const GenerateArgs& a) {
  set_threads(a.threads);
  if (a.out.empty() == a.out_dir.empty())
    fail_usage("give exactly one of --out FILE.png and --out-dir DIR");
  if (!a.out.empty()) {
    fs::path out(a.out);
    if (out.extension() != ".png") fail_usage("--out {}: the file name must end in .png", a.out);
    if (fs::is_directory(out)) fail_usage("--out {}: is a directory (use --out-dir)", a.out);
    check_writable_dir(out.parent_path().empty() ? fs::path(".") : out.parent_path(), "--out");
  } else {
    std::error_code ec;
    fs::create_directories(a.out_dir, ec);
    check_writable_dir(a.out_dir, "--out-dir");
  }
  if (a.steps && *a.steps < 1) fail_usage("--steps must be >= 1, got {}", *a.steps);
  if (a.control.empty() != a.control_model.empty())
    fail_usage("--control IMAGE and --control-model DIR go together");
  if (!a.control.empty() && !fs::is_regular_file(a.control))
    fail_usage("--control {}: no such file", a.control);
  std::vector<generate::LoRASpec> loras;
  for (const auto& value : a.loras)
    loras.push_back(generate::LoRASpec::parse(value));

  const auto device = parse_device(a.device);
  models::ModelLoadOptions load;
  load.device = device;
  load.dtype = parse_dtype(a.dtype, device);
  load.weights_dtype = parse_weights_dtype(a.weights_dtype, load.dtype);
  if (!a.unet.empty() && !fs::is_regular_file(a.unet))
    fail_usage("--unet {}: no such file", a.unet);
  generate::TextToImageModel model;
  if (fs::is_regular_file(a.model)) {
    if (!a.unet.empty()) fail_usage("--unet: not with a single-file --model (it has its own UNet)");
    model = generate::load_single_file(a.model, load, {a.config, shipped_vocab()});
  } else {
    if (!a.config.empty()) fail_usage("--config: only for a single-file --model FILE.safetensors");
    const auto dir = generate::resolve_model_dir(a.model, shipped_models_root());
    model = generate::load_model(dir, load, {a.unet});
  }
  generate::apply_loras(model, loras, a.lora_allow_partial);
  torch::Tensor control_image;
  if (!a.control_model.empty()) {
    if (!fs::exists(a.control_model))
      fail_usage("--control-model {}: no such directory", a.control_model);
    generate::attach_controlnet(model, models::load_controlnet(a.control_model, load),
                                fs::path(a.control_model).lexically_normal().filename().string());
    // RGB in [0, 1], as diffusers' control image processor (grey is repeated, alpha dropped).
    auto pixels = io::read_png(a.control).pixels;
    if (pixels.size(0) <= 2) pixels = pixels.narrow(0, 0, 1).expand({3, -1, -1});
    control_image = pixels.narrow(0, 0, 3).to(torch::kFloat32) / 255.0;
  }

  generate::GenerateRequest req;
  req.prompts.assign(static_cast<size_t>(a.batch), a.prompt);
  req.negative_prompt = a.negative_prompt;
  req.steps = a.steps.value_or(0);
  req.guidance_scale = a.guidance;
  if (!a.sampler.empty()) req.sampler = diffusion::parse_sampler_kind(a.sampler);
  if (!a.spacing.empty())
    req.timestep_spacing = diffusion::parse_timestep_spacing(a.spacing, "--timestep-spacing");
  if (!a.prediction.empty())
    req.prediction_type = diffusion::parse_prediction_type(a.prediction, "--prediction-type");
  req.seed = a.seed ? *a.seed : (std::random_device{}() & 0xFFFFFFFFu);
  req.height = a.height;
  req.width = a.width;
  if (a.vae_tiling)
    req.vae_tiling =
        models::VAETiling{a.vae_tile_size, std::max<int64_t>(8, a.vae_tile_size / 64 * 8)};
  req.control_image = control_image;
  req.control_scale = a.control_scale;
  if (!a.preset.empty()) generate::apply_preset(a.preset, req);
  const auto resolved = generate::resolve_request(model, req);
  std::vector<std::string> names;
  for (const auto& l : loras)
    names.push_back(fs::path(l.path).filename().string());
  for (const auto& w : generate::checkpoint_name_warnings(model, names, resolved))
    spdlog::warn("{}", w);
  if (!a.seed) spdlog::info("generate: seed {}", resolved.seed);

  std::unique_ptr<ProgressBar> bar;
  auto images = generate::generate(model, resolved, [&](int64_t done, int64_t total) {
    if (!bar) bar = std::make_unique<ProgressBar>("generate", total, "step");
    bar->update(done);
  });
  if (bar) bar->finish();
  const auto pixels = io::to_uint8_image(images);
  if (!a.out.empty()) {
    std::map<std::string, std::string> text{{"Software", "lightning.cpp"}};
    if (a.batch == 1) {
      text["parameters"] = generate::parameters_text(model, resolved, 0);
      io::write_png(a.out, pixels[0], text);
    } else {
      text["parameters"] = generate::parameters_text(model, resolved, 0) +
                           fmt::format(", Batch: {} (grid, seeds {}..{}, row-major)", a.batch,
                                       resolved.seed, resolved.seed + a.batch - 1);
      io::write_png(a.out, io::make_grid(pixels), text);
    }
    std::printf("%s\n", a.out.c_str());
    return;
  }
  for (int64_t i = 0; i < a.batch; ++i) {
    auto path =
        (fs::path(a.out_dir) / fmt::format("{:03d}-seed{}.png", i, resolved.seed + i)).string();
    io::write_png(
        path, pixels[i],
        {{"parameters", generate::parameters_text(model, resolved, static_cast<size_t>(i))},
         {"Software", "lightning.cpp"}});
    std::printf("%s\n", path.c_str());
  }
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand(
      "generate",
      "Generate images from a text prompt. Without --steps/--guidance/--sampler the model's own "
      "recommended settings are used.\n"
      "Examples: lightning generate --prompt \"a photo of a sneaker\" --out sneaker.png\n"
      "          lightning generate --model fmnist-teacher --prompt \"an ankle boot\" --steps 8 "
      "--sampler ddim --seed 7 --batch 16 --out grid.png\n"
      "          lightning generate --prompt \"a bag\" --batch 4 --seed 1 --out-dir out/\n"
      "          lightning generate --model sdxl-base-dir --unet "
      "sdxl_lightning_4step_unet.safetensors "
      "--preset lightning-4step --prompt \"a fox\" --vae-tiling --out fox.png");
  cmd->add_option("--model", args->model,
                  "Model directory (diffusers layout), shipped model name (models/<name>) or "
                  "single-file checkpoint (.safetensors, SDXL or SD 1.x original layout)")
      ->capture_default_str();
  cmd->add_option("--unet", args->unet,
                  "UNet weights replacing the model's (e.g. sdxl_lightning_4step_unet.safetensors; "
                  "diffusers or original layout)");
  cmd->add_option("--config", args->config,
                  "For a single-file --model: a diffusers pipeline directory whose configs, "
                  "tokenizers and scheduler to use (default: built-in SDXL base / SD 1.5)");
  cmd->add_option("--preset", args->preset,
                  "SDXL-Lightning sampling settings: lightning-1step|2step|4step|8step (Euler, "
                  "trailing, no CFG; x0 prediction for 1 step); explicit flags override them")
      ->check(CLI::IsMember(generate::kPresetNames));
  cmd->add_flag("--vae-tiling", args->vae_tiling,
                "Decode the latents tile by tile (memory bounded by the tile size)");
  cmd->add_option("--vae-tile-size", args->vae_tile_size,
                  "Tile size in pixels for --vae-tiling (overlap: 1/8 of it)")
      ->check(CLI::Range(int64_t{64}, int64_t{4096}))
      ->capture_default_str();
  cmd->add_option("--control", args->control,
                  "ControlNet conditioning image (PNG; e.g. canny edges, white on black); the "
                  "default size is the image's");
  cmd->add_option("--control-model", args->control_model,
                  "ControlNet directory (diffusers ControlNetModel: config.json + "
                  "diffusion_pytorch_model.safetensors)");
  cmd->add_option("--control-scale", args->control_scale,
                  "Scale of the ControlNet's residuals (controlnet_conditioning_scale)")
      ->capture_default_str();
  cmd->add_option("--prompt", args->prompt, "The text prompt (\"\" = unconditional)")->required();
  cmd->add_option("--negative-prompt", args->negative_prompt,
                  "Prompt of the unconditional branch of classifier-free guidance");
  cmd->add_option("--steps", args->steps, "Sampling steps (default: the model's recommendation)");
  cmd->add_option("--guidance", args->guidance,
                  "Classifier-free guidance scale; <= 1 disables it (default: the model's)");
  cmd->add_option("--sampler", args->sampler, "euler or ddim (default: the model's)")
      ->check(CLI::IsMember({"euler", "ddim"}));
  cmd->add_option("--timestep-spacing", args->spacing,
                  "Override the scheduler's spacing: trailing, leading, linspace")
      ->check(CLI::IsMember({"trailing", "leading", "linspace"}));
  cmd->add_option("--prediction-type", args->prediction,
                  "Override what the model predicts: epsilon, v_prediction, sample")
      ->check(CLI::IsMember({"epsilon", "v_prediction", "sample"}));
  cmd->add_option("--seed", args->seed,
                  "Seed of the first image (image i uses seed + i; default: random)");
  cmd->add_option("--batch", args->batch, "Number of images")
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  cmd->add_option("--height", args->height, "Image height (default: the model's sample size)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--width", args->width, "Image width (default: the model's sample size)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--lora", args->loras,
                  "LoRA file to merge, FILE or FILE:SCALE (repeatable; kohya lora_unet_/lora_te_ "
                  "or diffusers/PEFT lora_A/lora_B keys)");
  cmd->add_flag("--lora-allow-partial", args->lora_allow_partial,
                "Apply a LoRA even when some of its keys match no layer (skipped with a warning)");
  cmd->add_option("--out", args->out, "Output PNG: the image, or a grid of the batch");
  cmd->add_option("--out-dir", args->out_dir, "Output directory: one PNG per image");
  add_dtype_device_options(*cmd, &args->dtype, &args->device);
  add_weights_dtype_option(*cmd, &args->weights_dtype);
  add_threads_option(*cmd, &args->threads);
  cmd->callback([args] { run_generate(*args); });
}

}  // namespace lightning::app
