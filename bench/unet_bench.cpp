#include "bench/unet_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include <torch/torch.h>

#include "core/error.h"
#include "core/system.h"
#include "diffusion/guidance.h"
#include "generate/pipeline.h"
#include "models/lora.h"
#include "models/model_loader.h"
#include "nn/layers.h"
#include "text/clip_tokenizer.h"

namespace lightning::bench {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

torch::ScalarType dtype_of(const std::string& name) {
  if (name == "f32") return torch::kFloat32;
  if (name == "bf16") return torch::kBFloat16;
  if (name == "f16") return torch::kFloat16;
  fail_usage("bench: unknown dtype '{}' (use f32, bf16, f16)", name);
}

// Random weights directly in the target dtype (uniform +-1/sqrt(fan_in), norms at 1), so that
// a 2.6B-parameter model is never held in f32 and bf16 at once.
void randomise(torch::nn::Module& module, torch::ScalarType dtype, torch::Device device) {
  torch::NoGradGuard no_grad;
  // The same weights in every run (libtorch seeds its default generators at random), so that
  // two runs of a bench, e.g. of `--distill` before and after a change, compute the same.
  torch::manual_seed(0);
  for (auto& item : module.named_parameters()) {
    auto& p = item.value();
    auto t = torch::empty(p.sizes(), torch::TensorOptions().dtype(dtype).device(device));
    const auto& name = item.key();
    if (p.dim() >= 2) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(p[0].numel()));
      t.uniform_(-bound, bound);
    } else if (name.find("norm") != std::string::npos && name.size() > 6 &&
               name.compare(name.size() - 6, 6, "weight") == 0) {
      t.fill_(1.0);
    } else {
      t.uniform_(-0.1, 0.1);
    }
    p.set_data(t);
  }
}

BenchRow gemm_row(torch::ScalarType dtype, const std::string& dtype_name, torch::Device device,
                  int repeat) {
  const int64_t n = 2048;
  auto opts = torch::TensorOptions().dtype(dtype).device(device);
  auto a = torch::randn({n, n}, opts), b = torch::randn({n, n}, opts);
  auto c = torch::mm(a, b);  // warm-up
  std::vector<double> times;
  for (int i = 0; i < std::max(repeat, 3); ++i) {
    const auto start = Clock::now();
    torch::mm_out(c, a, b);
    if (device.is_cuda()) torch::cuda::synchronize();
    times.push_back(seconds_since(start));
  }
  BenchRow row;
  row.what = "gemm 2048^3 (peak reference)";
  row.dtype = dtype_name;
  row.seconds = *std::min_element(times.begin(), times.end());
  row.gflop = 2.0 * n * n * n / 1e9;
  row.gflops = row.gflop / row.seconds;
  row.peak_rss_gb = peak_rss_bytes() / 1e9;
  return row;
}

models::UNetInputs random_inputs(const models::UNetConfig& config, int64_t batch, int64_t latent,
                                 int64_t tokens, torch::ScalarType dtype, torch::Device device) {
  auto opts = torch::TensorOptions().dtype(dtype).device(device);
  models::UNetInputs in;
  in.sample = torch::randn({batch, config.in_channels, latent, latent}, opts);
  in.timestep =
      torch::full({batch}, 999, torch::TensorOptions().dtype(torch::kInt64).device(device));
  in.encoder_hidden_states = torch::randn({batch, tokens, config.cross_attention_dim[0]}, opts);
  if (config.addition_embed_type == "text_time") {
    const int64_t pooled =
        config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim;
    in.text_embeds = torch::randn({batch, pooled}, opts);
    const float px = static_cast<float>(latent * 8);
    in.time_ids = torch::tensor({px, px, 0.f, 0.f, px, px}).repeat({batch, 1}).to(device);
  }
  return in;
}

void sync(torch::Device device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

void reset_peaks(torch::Device device) {
  reset_peak_rss();
  if (device.is_cuda()) {
    torch::zeros({1}, torch::TensorOptions().device(device));  // creates the allocator's state
    reset_peak_memory(device);
  }
}

double peak_gpu_gb(torch::Device device) {
  return device.is_cuda() ? peak_memory_bytes(device) / 1e9 : 0.0;
}

// Median seconds of `run` over options.repeat synchronised calls after options.warmup.
double median_seconds(const UNetBenchOptions& options, torch::Device device,
                      const std::function<void()>& run) {
  std::vector<double> times;
  for (int i = 0; i < options.warmup + options.repeat; ++i) {
    const auto start = Clock::now();
    run();
    sync(device);
    if (i >= options.warmup) times.push_back(seconds_since(start));
  }
  return median(times);
}

// Runs `run` warmup + repeat times (FLOPs counted on the first call) and returns the row with
// the median time, GFLOP/s and memory; the caller names it.
BenchRow timed_row(const UNetBenchOptions& options, torch::Device device, double params,
                   const std::function<void()>& run) {
  nn::flops::reset();
  nn::flops::enable(true);
  std::vector<double> times;
  for (int i = 0; i < options.warmup + options.repeat; ++i) {
    const auto start = Clock::now();
    run();
    sync(device);
    if (i >= options.warmup) times.push_back(seconds_since(start));
    if (i == 0) nn::flops::enable(false);
    // The GPU peak is the steady state's: cuDNN's algorithm search in the first calls tries
    // convolutions with large workspaces.
    if (i + 1 == options.warmup && device.is_cuda()) reset_peaks(device);
  }
  BenchRow row;
  row.seconds = median(times);
  row.gflop = nn::flops::total() / 1e9;
  row.gflops = row.gflop / row.seconds;
  row.peak_rss_gb = peak_rss_bytes() / 1e9;
  row.rss_gb = current_rss_bytes() / 1e9;
  row.params_m = params / 1e6;
  row.peak_gpu_gb = peak_gpu_gb(device);
  return row;
}

}  // namespace

void save_random_unet(const std::string& preset, const std::string& weights_dtype,
                      const std::string& dir) {
  auto unet = models::make_unet_uninitialised(models::UNetConfig::preset(preset));
  randomise(*unet, dtype_of(weights_dtype), torch::kCPU);
  models::save_unet(unet, dir);
}

std::vector<BenchRow> run_unet_bench(const UNetBenchOptions& options,
                                     const std::function<void(const std::string&)>& progress) {
  const torch::Device device(options.device);
  std::vector<BenchRow> rows;
  if (options.gemm) {
    for (const auto& dt : options.dtypes) {
      rows.push_back(gemm_row(dtype_of(dt), dt, device, options.repeat));
      progress(fmt::format("gemm {}: {:.1f} GFLOP/s", dt, rows.back().gflops));
    }
  }
  torch::NoGradGuard no_grad;
  struct Target {
    std::string name;
    models::UNetConfig config;
  };
  std::vector<Target> targets;
  if (!options.model_dir.empty()) {
    targets.push_back({options.model_dir, {}});
  } else {
    for (const auto& preset : options.presets)
      targets.push_back({preset, models::UNetConfig::preset(preset)});
  }
  for (const auto& target : targets) {
    for (const auto& dt : options.dtypes) {
      const auto dtype = dtype_of(dt);
      reset_peak_rss();
      models::UNet2DConditionModel unet{nullptr};
      if (!options.model_dir.empty()) {
        const auto start = Clock::now();
        unet = models::load_unet(options.model_dir, {dtype, device, "", {}});
        BenchRow row;
        row.what = fmt::format("load {}", options.model_dir);
        row.dtype = dt;
        row.seconds = seconds_since(start);
        row.peak_rss_gb = peak_rss_bytes() / 1e9;
        row.rss_gb = current_rss_bytes() / 1e9;
        rows.push_back(row);
        progress(fmt::format("{} as {}: {:.1f} s, RSS {:.2f} GB, peak {:.2f} GB", row.what, dt,
                             row.seconds, row.rss_gb, row.peak_rss_gb));
      } else {
        unet = models::make_unet_uninitialised(target.config);
        randomise(*unet, dtype, device);
        unet->eval();
      }
      const auto& config = unet->config;
      const bool tiny = config.block_out_channels[0] < 128;
      auto latents = options.latents;
      if (latents.empty())
        latents = tiny ? std::vector<int64_t>{32} : std::vector<int64_t>{64, 128};
      double params = 0;
      for (const auto& p : unet->parameters())
        params += p.numel();
      if (options.train_step) {
        for (auto& p : unet->parameters())
          p.set_requires_grad(false);
        models::attach_lora(*unet, {options.lora_rank, static_cast<double>(options.lora_rank),
                                    models::LoRAConfig{}.exclude, std::nullopt});
        unet->train();
      }
      for (const auto latent : latents) {
        auto in = random_inputs(config, options.batch, latent, options.tokens, dtype, device);
        if (options.train_step) {
          torch::AutoGradMode grad_mode(true);
          // Checkpointed first: the heap is never trimmed (tune_allocator), so a later row's peak
          // RSS cannot fall below an earlier row's.
          for (const bool checkpointing : {true, false}) {
            unet->gradient_checkpointing = checkpointing;
            reset_peaks(device);
            auto row = timed_row(options, device, params, [&] {
              unet->forward(in).to(torch::kFloat32).square().mean().backward();
            });
            row.what = fmt::format("LoRA-{} train step {} {}x{} batch {}{}", options.lora_rank,
                                   target.name, latent, latent, options.batch,
                                   checkpointing ? ", checkpointed" : "");
            row.dtype = dt;
            rows.push_back(row);
            progress(fmt::format("{} {}: {:.3f} s/step, peak RSS {:.2f} GB, peak GPU {:.2f} GB",
                                 row.what, dt, row.seconds, row.peak_rss_gb, row.peak_gpu_gb));
          }
          continue;
        }
        reset_peaks(device);
        auto row = timed_row(options, device, params, [&] { unet->forward(in); });
        row.what =
            fmt::format("unet {} {}x{} batch {}", target.name, latent, latent, options.batch);
        row.dtype = dt;
        rows.push_back(row);
        progress(fmt::format("{} {}: {:.3f} s/forward, {:.1f} GFLOP/s, peak RSS {:.2f} GB",
                             row.what, dt, row.seconds, row.gflops, row.peak_rss_gb));
      }
    }
  }
  return rows;
}

std::vector<BenchRow> run_vae_bench(const UNetBenchOptions& options,
                                    const std::function<void(const std::string&)>& progress) {
  const torch::Device device(options.device);
  std::vector<BenchRow> rows;
  torch::NoGradGuard no_grad;
  for (const auto& preset : options.vae_presets) {
    if (preset != "sdxl" && preset != "tiny")
      fail_usage("bench: unknown VAE preset '{}' (known: sdxl, tiny)", preset);
    const auto config = preset == "sdxl" ? models::VAEConfig::sdxl() : models::VAEConfig::tiny();
    auto images = options.images;
    if (images.empty())
      images = preset == "sdxl" ? std::vector<int64_t>{512, 1024} : std::vector<int64_t>{64};
    for (const auto& dt : options.dtypes) {
      const auto dtype = dtype_of(dt);
      auto vae = models::make_vae_uninitialised(config);
      randomise(*vae, dtype, device);
      vae->eval();
      double params = 0;
      for (const auto& p : vae->decoder->parameters())
        params += p.numel();
      for (const auto size : images) {
        const int64_t f = config.downscale();
        if (size % f != 0) fail_usage("bench: image size {} is not a multiple of {}", size, f);
        reset_peaks(device);
        auto latent = torch::randn({options.batch, config.latent_channels, size / f, size / f},
                                   torch::TensorOptions().dtype(dtype).device(device));
        const models::VAETiling tiling{options.vae_tile,
                                       std::max<int64_t>(f, options.vae_tile / 8 / f * f)};
        auto row = timed_row(options, device, params, [&] {
          options.vae_tile > 0 ? vae->decode_tiled(latent, tiling) : vae->decode(latent);
        });
        row.what = fmt::format("vae-decode {} {}x{} batch {}{}", preset, size, size, options.batch,
                               options.vae_tile > 0
                                   ? fmt::format(" tiled {}/{}", tiling.tile, tiling.overlap)
                                   : std::string());
        row.dtype = dt;
        rows.push_back(row);
        progress(fmt::format("{} {}: {:.3f} s, {:.1f} GFLOP/s, peak RSS {:.2f} GB", row.what, dt,
                             row.seconds, row.gflops, row.peak_rss_gb));
      }
    }
  }
  return rows;
}

namespace {

double count_params(torch::nn::Module& module) {
  double n = 0;
  for (const auto& p : module.parameters())
    n += static_cast<double>(p.numel());
  return n;
}

}  // namespace

generate::TextToImageModel random_pipeline(const std::string& preset,
                                           const models::ModelLoadOptions& load, bool vae_upcast,
                                           const std::string& vocab, bool initialise) {
  using namespace models;
  UNetConfig unet_config;
  CLIPTextConfig te1 = CLIPTextConfig::sdxl_clip_l(), te2 = CLIPTextConfig::sdxl_clip_g();
  VAEConfig vae_config;
  if (preset == "sdxl") {
    unet_config = UNetConfig::sdxl();
    vae_config = VAEConfig::sdxl();
  } else if (preset == "tiny-sdxl") {
    unet_config = UNetConfig::tiny_sdxl();  // cross-attention 32 = 16 + 16, pooled 16
    for (auto* te : {&te1, &te2}) {
      te->hidden_size = 16;
      te->intermediate_size = 32;
      te->num_hidden_layers = 2;
      te->num_attention_heads = 2;
      te->projection_dim = 16;
    }
    vae_config = VAEConfig::tiny();
    vae_config.force_upcast = true;
  } else {
    fail_usage("bench --pipeline {}: not a preset (sdxl, tiny-sdxl), directory or file", preset);
  }
  vae_config.force_upcast = vae_config.force_upcast && vae_upcast;
  generate::TextToImageModel model;
  model.name = "random " + preset;
  generate::use_builtin_tokenizers_and_scheduler(model, vocab, /*sdxl=*/true);
  model.force_zeros_for_empty_prompt = true;
  model.unet = make_unet_uninitialised(unet_config);
  model.text_encoder = make_clip_text_uninitialised(te1);
  model.text_encoder_2 = make_clip_text_uninitialised(te2);
  model.vae = make_vae_uninitialised(vae_config);
  // Weights as the loaders hold them: in load.weights_dtype, computing in load.dtype.
  const auto held = load.weights().dtype;
  const auto device = load.device;
  const bool upcast = load.dtype == torch::kFloat16 && vae_config.force_upcast;
  if (!initialise) return model;
  randomise(*model.unet, held, device);
  randomise(*model.text_encoder, held, device);
  randomise(*model.text_encoder_2, held, device);
  randomise(*model.vae, upcast && !load.weights_dtype ? torch::kFloat32 : held, device);
  model.unet->compute_dtype = load.dtype;
  model.text_encoder->set_compute_dtype(load.dtype);
  model.text_encoder_2->set_compute_dtype(load.dtype);
  model.vae->compute_dtype = upcast ? torch::kFloat32 : load.dtype;
  for (torch::nn::Module* m : {static_cast<torch::nn::Module*>(model.unet.get()),
                               static_cast<torch::nn::Module*>(model.text_encoder.get()),
                               static_cast<torch::nn::Module*>(model.text_encoder_2.get()),
                               static_cast<torch::nn::Module*>(model.vae.get())})
    m->eval();
  return model;
}

namespace {

generate::TextToImageModel bench_pipeline(const UNetBenchOptions& options, torch::ScalarType dtype,
                                          torch::Device device) {
  const std::string& what = options.pipeline;
  models::ModelLoadOptions load{dtype, device, "", {}};
  if (!options.weights_dtype.empty()) load.weights_dtype = dtype_of(options.weights_dtype);
  if (std::filesystem::is_directory(what)) return generate::load_model(what, load);
  if (std::filesystem::is_regular_file(what))
    return generate::load_single_file(what, load, {"", options.vocab});
  return random_pipeline(what, load, options.vae_upcast, options.vocab);
}

}  // namespace

std::vector<BenchRow> run_pipeline_bench(const UNetBenchOptions& options,
                                         const std::function<void(const std::string&)>& progress) {
  const torch::Device device(options.device);
  std::vector<BenchRow> rows;
  torch::NoGradGuard no_grad;
  for (const auto& dt : options.dtypes) {
    const auto dtype = dtype_of(dt);
    const std::string label = options.weights_dtype.empty() || options.weights_dtype == dt
                                  ? dt
                                  : fmt::format("{} (weights {})", dt, options.weights_dtype);
    reset_peaks(device);
    const auto load_start = Clock::now();
    auto model = bench_pipeline(options, dtype, device);
    {
      BenchRow row;
      row.what = fmt::format("load {}", model.name);
      row.dtype = label;
      row.seconds = seconds_since(load_start);
      row.params_m = (count_params(*model.unet) + count_params(*model.text_encoder) +
                      (model.is_sdxl() ? count_params(*model.text_encoder_2) : 0.0) +
                      (model.is_latent() ? count_params(*model.vae) : 0.0)) /
                     1e6;
      row.peak_rss_gb = peak_rss_bytes() / 1e9;
      row.rss_gb = current_rss_bytes() / 1e9;
      row.peak_gpu_gb = peak_gpu_gb(device);
      rows.push_back(row);
      progress(fmt::format("{} as {}: {:.1f} s, {:.0f}M parameters, RSS {:.2f} GB", row.what, label,
                           row.seconds, row.params_m, row.rss_gb));
    }
    auto images = options.images;
    if (images.empty()) images = {model.sample_size()};
    for (const auto size : images) {
      generate::GenerateRequest request;
      request.prompts = {"a photo of an astronaut riding a horse on the moon"};
      request.steps = options.steps;
      request.guidance_scale = options.guidance;
      request.sampler = diffusion::SamplerKind::kEuler;
      request.timestep_spacing = diffusion::TimestepSpacing::kTrailing;
      request.height = request.width = size;
      if (options.vae_tile > 0) {
        const int64_t f = model.vae_scale();
        request.vae_tiling =
            models::VAETiling{options.vae_tile, std::max<int64_t>(f, options.vae_tile / 8 / f * f)};
      }
      const auto resolved = generate::resolve_request(model, request);
      const std::string name = fmt::format(
          "{} {}x{} {} steps{}{}", model.name, size, size, resolved.steps,
          diffusion::uses_guidance(*resolved.guidance_scale)
              ? fmt::format(" cfg {:g}", *resolved.guidance_scale)
              : std::string(),
          request.vae_tiling ? fmt::format(" vae tiles {}", request.vae_tiling->tile) : "");
      // End to end: prompt to pixels on the host. UNet steps are timed between the callbacks.
      reset_peaks(device);
      std::vector<double> totals, steps;
      torch::Tensor latents;
      for (int i = 0; i < options.warmup + options.repeat; ++i) {
        const bool timed = i >= options.warmup;
        const auto start = Clock::now();
        auto last = start;
        generate::generate(
            model, request,
            [&](int64_t done, int64_t) {
              sync(device);
              const auto now = Clock::now();
              // The first step's time also holds the text encoders; later steps are pure.
              if (timed && done > 1)
                steps.push_back(std::chrono::duration<double>(now - last).count());
              last = now;
            },
            &latents);
        sync(device);
        if (timed) totals.push_back(seconds_since(start));
        if (i + 1 == options.warmup && device.is_cuda()) reset_peaks(device);
      }
      const double peak_rss = peak_rss_bytes() / 1e9, peak_gpu = peak_gpu_gb(device);
      auto add = [&](const std::string& what, double seconds) {
        BenchRow row;
        row.what = what;
        row.dtype = label;
        row.seconds = seconds;
        row.peak_rss_gb = peak_rss;
        row.rss_gb = current_rss_bytes() / 1e9;
        row.peak_gpu_gb = peak_gpu;
        rows.push_back(row);
        progress(fmt::format("{} {}: {:.4f} s", what, label, seconds));
      };
      add(fmt::format("end to end {}", name), median(totals));
      // The parts, timed on their own.
      add(fmt::format("  text encoders {}", name), median_seconds(options, device, [&] {
            generate::encode_conditioning(model, request.prompts, false);
          }));
      if (!steps.empty()) add(fmt::format("  unet step {}", name), median(steps));
      const auto on_device = latents.to(device);
      add(fmt::format("  vae decode {}", name), median_seconds(options, device, [&] {
            generate::decode_latents(model, on_device, request.vae_tiling);
          }));
    }
  }
  return rows;
}

std::string format_bench_table(const std::vector<BenchRow>& rows) {
  const bool gpu =
      std::any_of(rows.begin(), rows.end(), [](const BenchRow& r) { return r.peak_gpu_gb > 0; });
  std::string out =
      "| what | dtype | params (M) | seconds | GFLOP | GFLOP/s | RSS after (GB) | peak RSS (GB) |" +
      std::string(gpu ? " peak GPU (GB) |" : "") + "\n|---|---|---|---|---|---|---|---|" +
      (gpu ? "---|" : "") + "\n";
  for (const auto& r : rows) {
    auto opt = [](double v, const char* format) {
      return v > 0 ? fmt::format(fmt::runtime(format), v) : std::string("-");
    };
    out += fmt::format("| {} | {} | {} | {:.4f} | {} | {} | {} | {:.2f} |{}\n", r.what, r.dtype,
                       opt(r.params_m, "{:.1f}"), r.seconds, opt(r.gflop, "{:.1f}"),
                       opt(r.gflops, "{:.1f}"), opt(r.rss_gb, "{:.2f}"), r.peak_rss_gb,
                       gpu ? fmt::format(" {:.2f} |", r.peak_gpu_gb) : std::string());
  }
  return out;
}

}  // namespace lightning::bench
