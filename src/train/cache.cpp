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
#include "io/safetensors_bytes.h"

namespace fs = std::filesystem;

namespace lightning::train {
namespace {

struct Pending {
  std::string source;  // shard:key
  data::Fitted fitted;
  std::string caption;
};

}  // namespace

CacheResult write_cache(const generate::TextToImageModel& model, const std::string& model_name,
                        const data::DataSource& source, const CacheOptions& options) {
  if (options.shard_size < 1) fail("cache: the shard size must be >= 1");
  data::DataSource one_pass = source;
  one_pass.shuffle_buffer = 1;  // file order
  data::SampleStream stream(one_pass);
  const int64_t resolution = options.resolution > 0 ? options.resolution : model.sample_size();
  const auto buckets = data::make_buckets(resolution, model.size_multiple(), options.max_aspect);
  CacheResult result;
  int64_t context_dim = 0;
  torch::NoGradGuard no_grad;

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
    while (true) {
      auto sample = stream.next();
      if (sample.epoch > 0) break;  // one pass
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
    if (shard) shard->close();
    bar.finish();
    result.skipped = stream.stats().skipped;
    result.index = {{"model", model_name},
                    {"samples", result.samples},
                    {"skipped", result.skipped},
                    {"shards", fmt::format("cache-{{{:06d}..{:06d}}}.tar", 0, result.shards - 1)},
                    {"resolution", resolution},
                    {"max_aspect", options.max_aspect},
                    {"divisor", model.size_multiple()},
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
  if (index.value("divisor", int64_t{-1}) != model.size_multiple())
    fail("{}: made for a model whose sizes are multiples of {}, not {}", path,
         index.value("divisor", int64_t{-1}), model.size_multiple());
  return index;
}

}  // namespace lightning::train
