#include "bench/unet_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include <torch/torch.h>

#include "core/error.h"
#include "core/system.h"
#include "models/model_loader.h"
#include "nn/layers.h"

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

}  // namespace

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
  for (const auto& preset : options.presets) {
    const auto config = models::UNetConfig::preset(preset);
    const bool tiny = preset.rfind("tiny", 0) == 0;
    auto latents = options.latents;
    if (latents.empty()) latents = tiny ? std::vector<int64_t>{32} : std::vector<int64_t>{64, 128};
    for (const auto& dt : options.dtypes) {
      const auto dtype = dtype_of(dt);
      reset_peak_rss();
      auto unet = models::make_unet_uninitialised(config);
      randomise(*unet, dtype, device);
      unet->eval();
      double params = 0;
      for (const auto& p : unet->parameters()) params += p.numel();
      for (const auto latent : latents) {
        reset_peak_rss();
        const int64_t B = options.batch;
        auto opts = torch::TensorOptions().dtype(dtype).device(device);
        models::UNetInputs in;
        in.sample = torch::randn({B, config.in_channels, latent, latent}, opts);
        in.timestep = torch::full({B}, 999, torch::TensorOptions().dtype(torch::kInt64).device(device));
        in.encoder_hidden_states = torch::randn({B, options.tokens, config.cross_attention_dim[0]}, opts);
        if (config.addition_embed_type == "text_time") {
          const int64_t pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim;
          in.text_embeds = torch::randn({B, pooled}, opts);
          const int64_t px = latent * 8;
          in.time_ids = torch::tensor({px, px, 0l, 0l, px, px}, torch::kFloat32).repeat({B, 1}).to(device);
        }
        nn::flops::reset();
        nn::flops::enable(true);
        std::vector<double> times;
        for (int i = 0; i < options.warmup + options.repeat; ++i) {
          const auto start = Clock::now();
          auto out = unet->forward(in);
          if (device.is_cuda()) torch::cuda::synchronize();
          if (i >= options.warmup) times.push_back(seconds_since(start));
          if (i == 0) nn::flops::enable(false);
        }
        BenchRow row;
        row.what = fmt::format("unet {} {}x{} batch {}", preset, latent, latent, B);
        row.dtype = dt;
        row.seconds = median(times);
        row.gflop = nn::flops::total() / 1e9;
        row.gflops = row.gflop / row.seconds;
        row.peak_rss_gb = peak_rss_bytes() / 1e9;
        row.params_m = params / 1e6;
        rows.push_back(row);
        progress(fmt::format("{} {}: {:.3f} s/forward, {:.1f} GFLOP/s, peak RSS {:.2f} GB",
                             row.what, dt, row.seconds, row.gflops, row.peak_rss_gb));
      }
    }
  }
  return rows;
}

std::string format_bench_table(const std::vector<BenchRow>& rows) {
  std::string out =
      "| what | dtype | params (M) | s / forward | GFLOP / forward | GFLOP/s | peak RSS (GB) |\n"
      "|---|---|---|---|---|---|---|\n";
  for (const auto& r : rows) {
    out += fmt::format("| {} | {} | {} | {:.4f} | {:.1f} | {:.1f} | {:.2f} |\n", r.what, r.dtype,
                       r.params_m > 0 ? fmt::format("{:.1f}", r.params_m) : "-", r.seconds,
                       r.gflop, r.gflops, r.peak_rss_gb);
  }
  return out;
}

}  // namespace lightning::bench
