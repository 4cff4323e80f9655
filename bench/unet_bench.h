// `lightning bench`: UNet forward timings, peak RSS and achieved GFLOP/s next to a GEMM peak
// measured in the same run (the machine is noisy: compare within one run).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "generate/pipeline.h"
#include "models/model_loader.h"

namespace lightning::bench {

struct UNetBenchOptions {
  std::vector<std::string> presets = {"tiny-sdxl"};  // UNet config presets (unet_config.h)
  std::vector<std::string> dtypes = {"f32", "bf16"};
  std::vector<int64_t> latents;  // latent sizes; empty: 64,128 for sdxl/sd15, 32 for tiny ones
  int64_t batch = 1;
  int64_t tokens = 77;  // text tokens of encoder_hidden_states
  int warmup = 1;
  int repeat = 3;
  bool gemm = true;  // also measure the f32/bf16 GEMM peak (mm 2048^3)
  std::string device = "cpu";
  // Training steps instead of forwards (`--train-step`): one forward + backward of a LoRA
  // student (rank `lora_rank` on the frozen random UNet, as a LoRA stage trains), with and
  // without gradient checkpointing: seconds and peak memory per step.
  bool train_step = false;
  int64_t lora_rank = 64;
  // Benchmark a model directory instead of random weights: the load itself becomes a row
  // (seconds, RSS after loading, peak RSS while loading), then the forwards.
  std::string model_dir;
  // VAE decode benchmark instead of the UNet's: presets ("tiny", "sdxl"), image sizes (default
  // 512,1024 for sdxl, 64 for tiny) and a tile size in pixels (0: untiled).
  std::vector<std::string> vae_presets;
  std::vector<int64_t> images;
  int64_t vae_tile = 0;
  // End-to-end text-to-image benchmark instead: a random-weight pipeline preset ("sdxl",
  // "tiny-sdxl") or a model directory / single-file checkpoint, at `images` sizes (default 1024
  // for sdxl), `steps` Euler steps (trailing), `guidance` (<= 1: no CFG, as SDXL-Lightning).
  std::string pipeline;
  int64_t steps = 4;
  double guidance = 0;
  bool vae_upcast = true;     // random presets: keep force_upcast (the VAE runs in f32 for f16)
  std::string weights_dtype;  // pipeline: hold weights in this dtype ("": the compute dtype)
  std::string vocab;          // the CLIP vocabulary for random presets and single files
};

// A random-weight text-to-image pipeline: SDXL base 1.0's shapes ("sdxl": 2.6B UNet, CLIP-L and
// OpenCLIP-bigG, the 84M VAE) or a tiny one of the same structure ("tiny-sdxl"), its weights
// held as `load` says, with the CLIP vocabulary at `vocab`; `vae_upcast` keeps SDXL's
// force_upcast.
// `initialise` false leaves the weights uninitialised (float32, never written: not resident),
// for what only needs the shapes.
generate::TextToImageModel random_pipeline(const std::string& preset,
                                           const models::ModelLoadOptions& load, bool vae_upcast,
                                           const std::string& vocab, bool initialise = true);

// Writes a random-weight UNet of `preset` as a diffusers model directory with weights stored in
// `weights_dtype` (f32, f16, bf16), for load benchmarks (e.g. a full-size SDXL UNet).
void save_random_unet(const std::string& preset, const std::string& weights_dtype,
                      const std::string& dir);

struct BenchRow {
  std::string what;  // "unet sdxl 64x64" or "gemm 2048^3"
  std::string dtype;
  double seconds = 0;      // median per forward
  double gflop = 0;        // per forward
  double gflops = 0;       // achieved GFLOP/s
  double peak_rss_gb = 0;  // process high-water mark during this row
  double params_m = 0;     // parameters in millions
  double rss_gb = 0;       // RSS at the end of the row (load rows: after loading)
  double peak_gpu_gb = 0;  // CUDA: peak bytes allocated by tensors during the row
};

// Runs the benchmark; `progress` receives one line per finished measurement.
std::vector<BenchRow> run_unet_bench(const UNetBenchOptions& options,
                                     const std::function<void(const std::string&)>& progress);

// VAE decodes of random latents with random weights (options.vae_presets, images, vae_tile,
// dtypes, warmup, repeat, device).
std::vector<BenchRow> run_vae_bench(const UNetBenchOptions& options,
                                    const std::function<void(const std::string&)>& progress);

// Text-to-image end to end (options.pipeline): rows for the whole generate() call (prompt to
// pixels on the host), the text encoders, one UNet step and the VAE decode, per dtype and size.
std::vector<BenchRow> run_pipeline_bench(const UNetBenchOptions& options,
                                         const std::function<void(const std::string&)>& progress);

// A Markdown table of the rows.
std::string format_bench_table(const std::vector<BenchRow>& rows);

}  // namespace lightning::bench
