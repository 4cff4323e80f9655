#include "data/buckets.h"

#include <algorithm>
#include <cmath>
#include <random>

#include <torch/torch.h>

#include "core/error.h"
#include "io/image_codecs.h"
#include "train/train_util.h"

namespace lightning::data {
namespace {

constexpr uint64_t kCropSeed = 43;

uint64_t crop_seed(uint64_t seed, int64_t epoch, const SampleKey& where) {
  return train::mix_seed(train::mix_seed(seed, kCropSeed, static_cast<uint64_t>(epoch)),
                         static_cast<uint64_t>(where.shard), static_cast<uint64_t>(where.ordinal));
}

nlohmann::json buckets_json(const std::vector<Bucket>& buckets) {
  auto out = nlohmann::json::array();
  for (const auto& b : buckets)
    out.push_back({b.height, b.width});
  return out;
}

}  // namespace

std::vector<Bucket> make_buckets(int64_t resolution, int64_t divisor, double max_aspect) {
  if (resolution < 1 || divisor < 1 || resolution % divisor != 0)
    fail("buckets: the resolution {} must be a positive multiple of {}", resolution, divisor);
  if (!(max_aspect >= 1)) fail("buckets: max_aspect must be >= 1, got {}", max_aspect);
  const int64_t area = resolution * resolution;
  std::vector<Bucket> wide;  // width >= height, from the square outwards
  for (int64_t w = resolution;; w += divisor) {
    const int64_t h = area / w / divisor * divisor;
    if (h < divisor || static_cast<double>(w) / static_cast<double>(h) > max_aspect + 1e-9) break;
    wide.push_back({h, w});
  }
  std::vector<Bucket> out;
  for (auto it = wide.rbegin(); it != wide.rend(); ++it)  // tall ones: the mirrors, tallest first
    if (it->height != it->width) out.push_back({it->width, it->height});
  out.insert(out.end(), wide.begin(), wide.end());
  return out;
}

int64_t bucket_step(int64_t requested, int64_t resolution, int64_t model_multiple) {
  if (requested > 0) {
    if (requested % model_multiple != 0 || resolution % requested != 0)
      fail(
          "[data] bucket_step = {} must be a multiple of the model's size multiple {} that divides "
          "the resolution {}",
          requested, model_multiple, resolution);
    return requested;
  }
  if (requested < 0) fail("[data] bucket_step = {} must be >= 0 (0: automatic)", requested);
  for (int64_t step = resolution / 16 / model_multiple * model_multiple; step > model_multiple;
       step -= model_multiple)
    if (resolution % step == 0) return step;
  return model_multiple;
}

void check_aspect(int64_t height, int64_t width, const Bucket& bucket, const std::string& what) {
  const double off = std::exp(
      std::abs(std::log(static_cast<double>(height) / static_cast<double>(width)) -
               std::log(static_cast<double>(bucket.height) / static_cast<double>(bucket.width))));
  if (off > kMaxAspectOverBucket)
    fail(
        "{}: a {}x{} (w x h) image is {:.1f} times wider or taller than its bucket {}x{}: a crop "
        "would keep {:.0f}% of it (the limit is {}x; a larger [data] max_aspect gives wider "
        "buckets)",
        what, width, height, off, bucket.width, bucket.height, 100 / off, kMaxAspectOverBucket);
}

void skip_unfitting_images(SampleStream& stream, std::vector<Bucket> buckets) {
  stream.set_filter([buckets = std::move(buckets)](const Sample& sample, const std::string& name) {
    if (sample.cached.empty())
      check_aspect(sample.image.size(1), sample.image.size(2),
                   buckets[nearest_bucket(buckets, sample.image.size(1), sample.image.size(2))],
                   name);
  });
}

size_t nearest_bucket(const std::vector<Bucket>& buckets, int64_t height, int64_t width) {
  if (buckets.empty()) fail("buckets: none defined");
  const double aspect = std::log(static_cast<double>(height) / static_cast<double>(width));
  size_t best = 0;
  double best_distance = INFINITY;
  for (size_t i = 0; i < buckets.size(); ++i) {
    const double d = std::abs(
        std::log(static_cast<double>(buckets[i].height) / static_cast<double>(buckets[i].width)) -
        aspect);
    if (d < best_distance - 1e-12) {
      best = i;
      best_distance = d;
    }
  }
  return best;
}

Fitted fit_to_bucket(const torch::Tensor& image, const Bucket& bucket, int64_t channels,
                     bool random_crop, uint64_t seed, const std::string& what) {
  const int64_t H = image.size(1), W = image.size(2);
  check_aspect(H, W, bucket, what);
  const double scale = std::max(static_cast<double>(bucket.height) / static_cast<double>(H),
                                static_cast<double>(bucket.width) / static_cast<double>(W));
  const int64_t rh = std::max<int64_t>(bucket.height, std::llround(static_cast<double>(H) * scale));
  const int64_t rw = std::max<int64_t>(bucket.width, std::llround(static_cast<double>(W) * scale));
  auto x = io::to_channels(image, channels).to(torch::kFloat32).unsqueeze(0);
  if (rh != H || rw != W) {
    namespace F = torch::nn::functional;
    x = F::interpolate(x, F::InterpolateFuncOptions()
                              .size(std::vector<int64_t>{rh, rw})
                              .mode(torch::kBilinear)
                              .align_corners(false)
                              .antialias(true));
  }
  int64_t top = (rh - bucket.height) / 2, left = (rw - bucket.width) / 2;
  if (random_crop) {
    std::mt19937_64 rng(seed);
    top = static_cast<int64_t>(rng() % static_cast<uint64_t>(rh - bucket.height + 1));
    left = static_cast<int64_t>(rng() % static_cast<uint64_t>(rw - bucket.width + 1));
  }
  Fitted out;
  out.pixels =
      (x[0].narrow(1, top, bucket.height).narrow(2, left, bucket.width).clamp(0, 255) / 127.5) - 1;
  out.time_ids = {H, W, top, left, bucket.height, bucket.width};
  return out;
}

BucketBatcher::BucketBatcher(SampleStream& stream, BatcherOptions options)
    : stream_(stream), options_(std::move(options)) {
  if (options_.buckets.empty()) fail("batcher: no bucket");
  if (options_.batch_size < 1) fail("batcher: batch size must be >= 1");
  waiting_.resize(options_.buckets.size());
  skip_unfitting_images(stream_, options_.buckets);
}

size_t BucketBatcher::bucket_of_cached(const Sample& sample) const {
  const auto ids = sample.cached.at("time_ids").to(torch::kInt64).flatten();
  const Bucket want{ids[4].item<int64_t>(), ids[5].item<int64_t>()};
  for (size_t b = 0; b < options_.buckets.size(); ++b)
    if (options_.buckets[b] == want) return b;
  fail(
      "data: {}:{} was cached for a {}x{} (w x h) bucket, which this recipe's buckets do not have "
      "(use the resolution and max_aspect the cache was made with)",
      stream_.shard_name(sample.where.shard), sample.key, want.width, want.height);
}

void BucketBatcher::add(Sample sample) {
  if (!sample.cached.empty()) {  // fitted when cached: no resize, no crop
    const size_t b = bucket_of_cached(sample);
    const auto pooled = sample.cached.find("pooled");
    Waiting w{sample.epoch,
              sample.where,
              {},
              sample.cached.at("context"),
              pooled == sample.cached.end() ? torch::Tensor() : pooled->second,
              std::move(sample.caption),
              stream_.shard_name(sample.where.shard) + ":" + sample.key};
    w.fitted.pixels = sample.cached.at("x").to(torch::kFloat32);
    const auto ids = sample.cached.at("time_ids").to(torch::kInt64).flatten();
    for (int k = 0; k < 6; ++k)
      w.fitted.time_ids[static_cast<size_t>(k)] = ids[k].item<int64_t>();
    waiting_[b].push_back(std::move(w));
    return;
  }
  const size_t b = nearest_bucket(options_.buckets, sample.image.size(1), sample.image.size(2));
  const std::string name = stream_.shard_name(sample.where.shard) + ":" + sample.key;
  auto fitted =
      fit_to_bucket(sample.image, options_.buckets[b], options_.channels, options_.random_crop,
                    crop_seed(options_.seed, sample.epoch, sample.where), name);
  waiting_[b].push_back(
      {sample.epoch, sample.where, std::move(fitted), {}, {}, std::move(sample.caption), name});
}

Batch BucketBatcher::next() {
  while (true) {
    add(stream_.next());
    for (size_t b = 0; b < waiting_.size(); ++b) {
      auto& queue = waiting_[b];
      if (static_cast<int64_t>(queue.size()) < options_.batch_size) continue;
      Batch batch;
      batch.bucket = options_.buckets[b];
      std::vector<torch::Tensor> pixels, contexts, pooled;
      auto ids = torch::empty({options_.batch_size, 6}, torch::kInt64);
      for (int64_t i = 0; i < options_.batch_size; ++i) {
        auto& w = queue[static_cast<size_t>(i)];
        pixels.push_back(w.fitted.pixels);
        if (w.context.defined()) contexts.push_back(w.context.to(torch::kFloat32));
        if (w.pooled.defined()) pooled.push_back(w.pooled.to(torch::kFloat32));
        for (int k = 0; k < 6; ++k)
          ids[i][k] = w.fitted.time_ids[static_cast<size_t>(k)];
        batch.captions.push_back(std::move(w.caption));
        batch.keys.push_back(std::move(w.name));
      }
      queue.erase(queue.begin(), queue.begin() + options_.batch_size);
      batch.pixels = torch::stack(pixels);
      batch.cached = !contexts.empty();
      if (batch.cached) {
        if (contexts.size() != pixels.size())
          fail("data: a batch mixes cached samples and images: keep them in separate data sets");
        batch.context = torch::stack(contexts);
        if (pooled.size() == contexts.size()) batch.pooled = torch::stack(pooled);
      }
      batch.time_ids = ids;
      return batch;
    }
  }
}

nlohmann::json BucketBatcher::state() const {
  auto waiting = nlohmann::json::array();
  for (size_t b = 0; b < waiting_.size(); ++b)
    for (const auto& w : waiting_[b])
      waiting.push_back({b, w.epoch, w.where.shard, w.where.ordinal});
  return {{"stream", stream_.position().to_json()},
          {"source", stream_.fingerprint()},
          {"buckets", buckets_json(options_.buckets)},
          {"samples", stream_.stats().samples},
          {"skipped", stream_.stats().skipped},
          {"damaged_shards", stream_.stats().damaged_shards},
          {"waiting", waiting},
          {"batch_size", options_.batch_size}};
}

void BucketBatcher::restore(const nlohmann::json& state) {
  if (state.at("buckets") != buckets_json(options_.buckets) ||
      state.at("batch_size") != options_.batch_size)
    fail(
        "data: the checkpoint was made with other buckets ({} saved, {} now) or another batch size "
        "({} saved, {} now); a run from before [data] bucket_step existed resumes with "
        "bucket_step = 8 (the VAE's factor; 1 for pixel models)",
        state.at("buckets").size(), options_.buckets.size(), state.at("batch_size").dump(),
        options_.batch_size);
  if (state.contains("source") && state.at("source") != stream_.fingerprint())
    fail(
        "data: the checkpoint was made from other data ({}; now {}): the shard list or the image "
        "folder's files changed, and the saved position means nothing in them",
        state.at("source").get<std::string>(), stream_.fingerprint());
  stream_.restore(StreamPosition::from_json(state.at("stream")));
  std::vector<std::pair<int64_t, SampleKey>> keys;
  for (const auto& w : state.at("waiting"))
    keys.push_back({w.at(1).get<int64_t>(), {w.at(2).get<int64_t>(), w.at(3).get<int64_t>()}});
  auto samples = stream_.load(keys);
  stream_.set_stats({state.value("samples", int64_t{0}), state.value("skipped", int64_t{0}),
                     state.value("damaged_shards", int64_t{0})});
  for (auto& q : waiting_)
    q.clear();
  // Each sample goes back to its bucket (the same choice as before: it depends on the image
  // alone) with the same crop (drawn from its key).
  for (auto& sample : samples)
    add(std::move(sample));
}

BatchPrefetcher::BatchPrefetcher(BucketBatcher& batcher, int64_t depth)
    : batcher_(batcher),
      depth_(static_cast<size_t>(std::max<int64_t>(depth, 0))),
      state_(batcher.state()) {
  if (depth_ > 0) worker_ = std::thread([this] { work(); });
}

BatchPrefetcher::~BatchPrefetcher() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (worker_.joinable()) worker_.join();  // after the batch it may be reading
}

void BatchPrefetcher::work() {
  torch::NoGradGuard no_grad;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [this] { return stopping_ || ready_.size() < depth_; });
      if (stopping_) return;
    }
    try {
      auto batch = batcher_.next();
      auto state = batcher_.state();
      std::lock_guard<std::mutex> lock(mutex_);
      ready_.emplace_back(std::move(batch), std::move(state));
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::current_exception();
      changed_.notify_all();
      return;
    }
    changed_.notify_all();
  }
}

Batch BatchPrefetcher::next() {
  if (depth_ == 0) {
    auto batch = batcher_.next();
    state_ = batcher_.state();
    return batch;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] { return !ready_.empty() || error_; });
  if (ready_.empty()) std::rethrow_exception(error_);
  auto [batch, state] = std::move(ready_.front());
  ready_.pop_front();
  state_ = std::move(state);
  lock.unlock();
  changed_.notify_all();
  return std::move(batch);
}

}  // namespace lightning::data
