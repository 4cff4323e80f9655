#include "train/cache.h"

#include <filesystem>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/error.h"
#include "core/progress.h"
#include "data/buckets.h"
#include "data/shards.h"
#include "io/files.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "io/safetensors_bytes.h"

namespace fs = std::filesystem;

namespace lightning::train {
namespace {

struct Pending {
  std::string source;  // shard:key
  data::Fitted fitted;
  std::string caption;
};

// Refuses an output directory that is, or holds, the data it would be made from: replacing it
// would delete that data.
void check_not_source(const std::string& out_dir, const data::DataSource& source) {
  std::error_code ec;
  const fs::path out = fs::weakly_canonical(out_dir, ec);
  auto inside = [&](const std::string& path) {
    const fs::path p = fs::weakly_canonical(path, ec);
    const auto rel = p.lexically_relative(out);
    return !rel.empty() && *rel.begin() != "..";
  };
  std::vector<std::string> paths;
  if (!source.image_folder.empty()) paths.push_back(source.image_folder);
  if (!source.shards.empty()) paths = data::expand_shard_list(source.shards);
  for (const auto& path : paths)
    if (inside(path))
      fail("cache: --out {} holds the data it would be made from ({}): choose another directory",
           out_dir, path);
}

double relative_difference(const torch::Tensor& got, const torch::Tensor& want) {
  const auto w = want.to(torch::kFloat64), g = got.to(torch::kFloat64);
  return (g - w).norm().item<double>() / std::max(w.norm().item<double>(), 1e-30);
}

}  // namespace

std::map<std::string, torch::Tensor> encoder_probe(const generate::TextToImageModel& model) {
  torch::NoGradGuard no_grad;
  std::map<std::string, torch::Tensor> out;
  const auto embeds = generate::encode_conditioning(
      model, {"a photo of a red bicycle leaning on a blue wall"}, /*warn_truncation=*/false);
  out["context"] = embeds.context;
  if (embeds.pooled.defined()) out["pooled"] = embeds.pooled;
  if (model.is_latent()) {
    const auto y = torch::arange(64, torch::kFloat32).view({1, 1, 64, 1});
    const auto x = torch::arange(64, torch::kFloat32).view({1, 1, 1, 64});
    const auto c = torch::arange(3, torch::kFloat32).view({1, 3, 1, 1});
    const auto pattern = 0.8 * torch::sin(0.2 * y + 2 * c) * torch::cos(0.15 * x - c);
    auto vae = model.vae;  // holders share the module; encode is non-const
    const auto device = vae->parameters().front().device();
    out["x"] = vae->config.to_unet_latent(vae->encode(pattern.to(device)).mean);
  }
  for (auto& [name, t] : out)  // compared and stored on the CPU, whatever the model's device
    t = t.to(torch::kCPU, torch::kFloat32);
  return out;
}

CacheResult write_cache(const generate::TextToImageModel& model, const std::string& model_name,
                        const data::DataSource& source, const CacheOptions& options) {
  if (options.shard_size < 1) fail("cache: the shard size must be >= 1");
  check_not_source(options.out_dir, source);
  data::DataSource one_pass = source;
  one_pass.shuffle_buffer = 1;  // file order
  data::SampleStream stream(one_pass);
  const int64_t resolution = options.resolution > 0 ? options.resolution : model.sample_size();
  const int64_t step = data::bucket_step(options.bucket_step, resolution, model.size_multiple());
  const auto buckets = data::make_buckets(resolution, step, options.max_aspect);
  data::skip_unfitting_images(stream, buckets);
  CacheResult result;
  int64_t context_dim = 0;
  torch::NoGradGuard no_grad;

  io::check_replaceable(options.out_dir, kCacheIndex);
  io::write_directory_atomic(options.out_dir, [&](const std::string& tmp) {
    std::optional<data::TarShardWriter> shard;
    int64_t in_shard = 0;
    std::vector<Pending> pending;
    auto flush = [&] {
      if (pending.empty()) return;
      std::vector<std::string> captions;
      for (const auto& p : pending)
        captions.push_back(p.caption);
      const auto embeds = generate::encode_conditioning(model, captions, /*warn_truncation=*/false);
      const auto& context = embeds.context;
      context_dim = context.size(-1);
      for (size_t i = 0; i < pending.size(); ++i) {
        auto& p = pending[i];
        torch::Tensor x = p.fitted.pixels.unsqueeze(0);
        if (model.is_latent()) {
          auto vae = model.vae;  // holders share the module; encode is non-const
          x = vae->config.to_unet_latent(vae->encode(x).mean);
        }
        if (!shard || in_shard == options.shard_size) {
          if (shard) shard->close();
          shard.emplace(fmt::format("{}/cache-{:06d}.tar", tmp, result.shards++));
          in_shard = 0;
        }
        const auto key = fmt::format("{:09d}", result.samples);
        const auto ids =
            torch::tensor(std::vector<int64_t>(p.fitted.time_ids.begin(), p.fitted.time_ids.end()));
        std::vector<std::pair<std::string, torch::Tensor>> tensors = {
            {"x", x[0].to(options.dtype)},
            {"context", context[static_cast<int64_t>(i)].to(options.dtype)},
            {"time_ids", ids}};
        if (embeds.pooled.defined())  // SDXL: the second text encoder's pooled projection
          tensors.emplace_back("pooled", embeds.pooled[static_cast<int64_t>(i)].to(options.dtype));
        shard->add(key + ".safetensors",
                   io::encode_safetensors(tensors, {{"source", p.source}}, key));
        shard->add(key + ".txt", p.caption);
        ++in_shard;
        ++result.samples;
      }
      pending.clear();
    };
    ProgressBar bar("cache", 0, "img");
    data::Sample sample;
    while (stream.next_of_epoch(&sample)) {  // one pass
      const auto& bucket =
          buckets[data::nearest_bucket(buckets, sample.image.size(1), sample.image.size(2))];
      pending.push_back({stream.shard_name(sample.where.shard) + ":" + sample.key,
                         data::fit_to_bucket(sample.image, bucket, model.image_channels(),
                                             /*random_crop=*/false, 0),
                         sample.caption});
      if (static_cast<int64_t>(pending.size()) == options.text_batch) flush();
      bar.update(result.samples + static_cast<int64_t>(pending.size()));
    }
    flush();
    if (result.samples == 0)
      fail("cache: {} holds no usable sample ({} skipped)",
           source.shards.empty() ? source.image_folder : source.shards, stream.stats().skipped);
    if (shard) shard->close();
    bar.finish();
    const auto probe = encoder_probe(model);
    io::save_safetensors(tmp + "/" + kCacheProbe, {probe.begin(), probe.end()});
    result.skipped = stream.stats().skipped;
    result.index = {{"model", model_name},
                    {"samples", result.samples},
                    {"skipped", result.skipped},
                    {"shards", fmt::format("cache-{{{:06d}..{:06d}}}.tar", 0, result.shards - 1)},
                    {"resolution", resolution},
                    {"max_aspect", options.max_aspect},
                    {"divisor", step},
                    {"dtype", std::string(c10::toString(options.dtype))},
                    {"x_channels", model.latent_channels()},
                    {"context_dim", context_dim},
                    {"source", source.shards.empty() ? source.image_folder : source.shards}};
    io::write_json_file(tmp + "/" + kCacheIndex, result.index);
  });
  spdlog::info("cache: {} samples in {} shard(s) written to {} ({} skipped)", result.samples,
               result.shards, options.out_dir, result.skipped);
  return result;
}

nlohmann::json read_cache_index(const std::string& dir, const generate::TextToImageModel& model) {
  const auto path = (fs::path(dir) / kCacheIndex).string();
  if (!fs::exists(path)) fail("{}: not found: make the cache with `lightning cache`", path);
  const auto index = io::read_json_file(path);
  if (index.value("x_channels", int64_t{-1}) != model.latent_channels())
    fail(
        "{}: the cache holds {}-channel inputs but the model takes {}: it was made for another "
        "model ({})",
        path, index.value("x_channels", int64_t{-1}), model.latent_channels(),
        index.value("model", std::string("?")));
  const int64_t divisor = index.value("divisor", int64_t{-1});
  if (divisor < 1 || divisor % model.size_multiple() != 0)
    fail("{}: made for sizes in steps of {}, which the model's multiple {} does not divide", path,
         divisor, model.size_multiple());
  const auto probe_path = (fs::path(dir) / kCacheProbe).string();
  if (!fs::exists(probe_path)) {
    spdlog::warn(
        "{}: no {}: cannot check that the cache was made with this model's encoders (it says {})",
        path, kCacheProbe, index.value("model", std::string("?")));
    return index;
  }
  io::SafetensorsFile saved(probe_path);
  for (const auto& [name, now] : encoder_probe(model)) {
    const char* what = name == "x" ? "VAE" : "text encoder";
    if (!saved.contains(name))
      fail("{}: has no '{}': the cache was made for a model without a {} like this one's",
           probe_path, name, what);
    const auto want = saved.get(name);
    if (want.sizes() != now.sizes())
      fail(
          "{}: '{}' is [{}] but this model's {} gives [{}]: the cache was made for another model "
          "({})",
          probe_path, name, fmt::join(want.sizes(), ", "), what, fmt::join(now.sizes(), ", "),
          index.value("model", std::string("?")));
    const double d = relative_difference(now, want);
    if (!(d <= kCacheProbeTolerance))
      fail(
          "{}: this model's {} differs from the one the cache was made with ({}): its output on "
          "the probe ('{}') differs by {:.1f}% (over {:.0f}%); make the cache again with this "
          "model",
          path, what, index.value("model", std::string("?")), name, 100 * d,
          100 * kCacheProbeTolerance);
  }
  return index;
}

}  // namespace lightning::train
