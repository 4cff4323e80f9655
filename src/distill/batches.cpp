#include "distill/batches.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/error.h"
#include "data/fashion_mnist.h"
#include "dist/group.h"
#include "distill/recipe.h"
#include "generate/pipeline.h"
#include "io/json_config.h"
#include "train/cache.h"

namespace lightning::distill {
namespace fs = std::filesystem;

RankRows::RankRows(int64_t global_batch, const dist::Group& group)
    : global(global_batch),
      count(global_batch / group.size()),
      first(global_batch / group.size() * group.rank()) {}

TrainingBatches::TrainingBatches(const DistillRecipe& recipe,
                                 const generate::TextToImageModel& teacher,
                                 const dist::Group& group, const torch::Device& device,
                                 const std::string& resume_file)
    : recipe_(recipe), device_(device), rows_(recipe.batch_size, group) {
  torch::NoGradGuard no_grad;
  const auto empty = generate::encode_negative(teacher, "");
  empty_.context = empty.context;
  empty_.pooled = empty.pooled;
  if (recipe.dataset == "fashion-mnist") {
    const auto dataset = data::load_fashion_mnist(data::Split::kTrain, recipe.data_dir);
    pixels_ = data::to_model_pixels(dataset.images);
    labels_ = dataset.labels;
    templates_ = static_cast<int64_t>(data::caption_templates().size());
    std::vector<std::string> captions;
    for (int64_t c = 0; c < data::kFashionMnistClasses; ++c)
      for (int64_t k = 0; k < templates_; ++k)
        captions.push_back(data::caption(c, static_cast<size_t>(k)));
    caption_context_ = generate::encode_prompts(teacher, captions);
    sampler_.emplace(pixels_.size(0), recipe.seed);
    smallest_side_ = std::min(pixels_.size(2), pixels_.size(3));
    return;
  }

  auto source = recipe.source;
  int64_t resolution = recipe.resolution > 0 ? recipe.resolution : teacher.sample_size();
  double max_aspect = recipe.max_aspect;
  int64_t step = 0;
  if (recipe.dataset == "cache") {  // encoded already, in the cache's buckets
    const auto index = train::read_cache_index(recipe.data_dir, teacher);
    source.shards = (fs::path(recipe.data_dir) / index.at("shards").get<std::string>()).string();
    resolution = index.at("resolution").get<int64_t>();
    max_aspect = index.at("max_aspect").get<double>();
    step = index.at("divisor").get<int64_t>();
  } else {
    step = data::bucket_step(recipe.bucket_step, resolution, teacher.size_multiple());
  }
  stream_.emplace(source, group.rank(), group.size());
  data::BatcherOptions batching;
  batching.batch_size = rows_.count;
  batching.channels = teacher.image_channels();
  batching.buckets = data::make_buckets(resolution, step, max_aspect);
  smallest_side_ = resolution;
  for (const auto& bucket : batching.buckets)
    smallest_side_ = std::min({smallest_side_, bucket.height, bucket.width});
  batching.random_crop = recipe.random_crop;
  batching.seed = recipe.seed;
  batcher_.emplace(*stream_, batching);
  if (!resume_file.empty()) {
    if (!fs::exists(resume_file))
      fail("{}: missing; the checkpoint was not made with streamed data", resume_file);
    const auto saved = io::read_json_file(resume_file).at("ranks");
    if (static_cast<int>(saved.size()) != group.size())
      fail("{}: the data position was saved by {} rank(s); resume with {}", resume_file,
           saved.size(), saved.size());
    batcher_->restore(saved.at(static_cast<size_t>(group.rank())));
  }
  prefetcher_.emplace(*batcher_, recipe.prefetch);
  const auto& middle = batching.buckets[batching.buckets.size() / 2];
  spdlog::info("data: {} shard(s), {} bucket(s) of about {}x{} pixels, batches of {} per rank",
               stream_->num_shards(), batching.buckets.size(), middle.height, middle.width,
               rows_.count);
}

Conditioning TrainingBatches::unconditional(const TrainingBatch& batch) const {
  return {empty_.context, empty_.pooled, batch.conditioning.time_ids};
}

TrainingBatch TrainingBatches::next(int64_t g, at::Generator& generator,
                                    generate::TextToImageModel& teacher) {
  if (streamed()) return next_streamed(teacher);
  TrainingBatch out;
  const auto index = rows_.of(sampler_->batch(g, rows_.global));
  out.x0 = pixels_.index_select(0, index).to(device_);
  const auto label = labels_.index_select(0, index);
  const auto tmpl =
      rows_.of(torch::randint(0, templates_, {rows_.global}, generator, torch::kInt64));
  out.conditioning.context =
      caption_context_.index_select(0, (label * templates_ + tmpl).to(caption_context_.device()));
  return out;
}

TrainingBatch TrainingBatches::next_streamed(generate::TextToImageModel& teacher) {
  TrainingBatch out;
  const auto wait_start = std::chrono::steady_clock::now();
  auto batch = prefetcher_->next();
  out.wait_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
  torch::NoGradGuard no_grad;
  auto& c = out.conditioning;
  if (batch.cached) {
    out.x0 = batch.pixels.to(device_);
    c.context = batch.context.to(device_);
    if (batch.pooled.defined()) c.pooled = batch.pooled.to(device_);
    if (batch.context.dim() != 3 || batch.context.size(2) != empty_.context.size(2))
      fail(
          "{}: the cached text encodings are {}-wide but the teacher's are {}: the cache was made "
          "with another text encoder",
          recipe_.data_dir, batch.context.size(-1), empty_.context.size(2));
    if (empty_.pooled.defined() &&
        (!batch.pooled.defined() || batch.pooled.size(-1) != empty_.pooled.size(-1)))
      fail(
          "{}: the cache holds no pooled text embeddings of the teacher's width {} (made by an "
          "older `lightning cache` or for another model): make it again",
          recipe_.data_dir, empty_.pooled.size(-1));
  } else {
    // Latent models train on the VAE's latent means (deterministic, as a cache holds).
    const auto pixels = batch.pixels.to(device_);
    out.x0 = teacher.is_latent()
                 ? teacher.vae->config.to_unet_latent(teacher.vae->encode(pixels).mean)
                 : pixels;
    auto embeds = generate::encode_conditioning(teacher, batch.captions);
    c.context = embeds.context;
    c.pooled = embeds.pooled;
  }
  // SDXL: the real crop's original size, top-left and target size (in pixels).
  if (teacher.is_sdxl()) c.time_ids = batch.time_ids.to(device_, torch::kFloat32);
  return out;
}

nlohmann::json TrainingBatches::gather_positions(const dist::Group& group) const {
  if (!streamed()) return nullptr;
  auto ranks = nlohmann::json::array();
  for (const auto& r : group.all_gather("data position", prefetcher_->state().dump()))
    ranks.push_back(nlohmann::json::parse(r));
  return ranks;
}

void TrainingBatches::add_position(nlohmann::json& line) const {
  if (!streamed()) return;
  line["data_epoch"] = prefetcher_->state().at("stream").at("epoch");
}

std::array<double, 2> TrainingBatches::data_faults() const {
  if (!streamed()) return {0, 0};
  const auto& state = prefetcher_->state();
  return {state.at("skipped").get<double>(), state.value("damaged_shards", 0.0)};
}

}  // namespace lightning::distill
