// Aspect-ratio bucketing (as NovelAI and SDXL train): a set of image sizes of about the same area
// with different aspect ratios; every image goes to the bucket closest to its own aspect ratio,
// is resized to cover it and cropped to it, and a batch holds images of one bucket. SDXL's size
// and crop conditioning (time_ids) is set from what was actually done to the image.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <torch/types.h>
#include <nlohmann/json.hpp>

#include "data/stream.h"

namespace lightning::data {

struct Bucket {
  int64_t height = 0, width = 0;
  bool operator==(const Bucket& o) const { return height == o.height && width == o.width; }
};

// Buckets of area <= resolution^2 whose sides are multiples of `divisor`, from the tallest to the
// widest allowed by `max_aspect` (>= 1; 1 gives the square alone): for every width w (a multiple
// of divisor), the largest height h with h * w <= resolution^2, kept when
// max(h, w) / min(h, w) <= max_aspect, and the tall mirrors. Resolution 1024, divisor 64,
// max_aspect 4 gives SDXL's sizes (1024x1024, 1152x896 (w x h), 1216x832, 1344x768, 1536x640, ...
// 2048x512), without the few lower-area neighbours SDXL's list also has (e.g. 1024x960).
std::vector<Bucket> make_buckets(int64_t resolution, int64_t divisor, double max_aspect);

// The step of the buckets' sides: `requested` when > 0 (a multiple of the model's own size
// multiple that divides the resolution), else resolution / 16 rounded down to a multiple of the
// model's that divides the resolution (at least the model's): 64 at 1024 (SDXL's list, kohya's
// bucket_reso_steps), 32 at 512. Throws Error naming [data] bucket_step for a bad request.
int64_t bucket_step(int64_t requested, int64_t resolution, int64_t model_multiple);

// The bucket whose aspect ratio is closest to h/w (on a log scale; ties: the first).
size_t nearest_bucket(const std::vector<Bucket>& buckets, int64_t height, int64_t width);

// An image fitted to a bucket, with SDXL's micro-conditioning:
// time_ids = (original height, original width, crop top, crop left, target height, target width),
// the crop in the coordinates of the resized image (as diffusers' SDXL training scripts do).
struct Fitted {
  torch::Tensor pixels;  // float [C, h, w] in [-1, 1]
  std::array<int64_t, 6> time_ids{};
};

// An image whose aspect ratio is more than this many times its bucket's (a banner or a strip)
// is refused by fit_to_bucket: a crop would keep under a quarter of it, and the resize to cover
// the bucket would grow without bound (a 4000x1 image covering 1024x1024: 25 GB).
constexpr double kMaxAspectOverBucket = 4.0;

// Throws Error naming `what` for an h x w image whose aspect ratio is more than
// kMaxAspectOverBucket times `bucket`'s.
void check_aspect(int64_t height, int64_t width, const Bucket& bucket, const std::string& what);

// Makes `stream` skip (count and log, as bad records) the images that check_aspect refuses for
// their nearest bucket, so that an epoch of such images alone ends as one without usable samples.
void skip_unfitting_images(SampleStream& stream, std::vector<Bucket> buckets);

// Resizes uint8 [C, H, W] (bilinear, antialiased) so that it covers `bucket`, then crops to it:
// at a random offset drawn from `seed` (random_crop) or at the centre; converts to `channels`.
// Throws Error naming `what` for an image too far from the bucket's aspect ratio (above).
Fitted fit_to_bucket(const torch::Tensor& image, const Bucket& bucket, int64_t channels,
                     bool random_crop, uint64_t seed, const std::string& what = "image");

struct Batch {
  // float [B, C, h, w] in [-1, 1], one bucket; for cached samples the model's input space
  // (latents for latent models) and `context` holds the captions' text encodings.
  torch::Tensor pixels;
  torch::Tensor context;
  torch::Tensor pooled;  // cached SDXL samples: the pooled text embeddings [B, P]
  bool cached = false;
  torch::Tensor time_ids;  // int64 [B, 6]
  std::vector<std::string> captions;
  std::vector<std::string> keys;  // "shard-name:key", for logs
  Bucket bucket;
};

struct BatcherOptions {
  int64_t batch_size = 1;
  int64_t channels = 3;
  std::vector<Bucket> buckets;  // one bucket: fixed-size training
  bool random_crop = true;
  uint64_t seed = 0;  // crop offsets: drawn per sample from (seed, epoch, shard, ordinal)
};

// Turns a SampleStream into batches: samples wait in their bucket until it holds batch_size,
// then the bucket is emitted. It sets the stream's filter: images too far from every bucket's
// aspect ratio (check_aspect) are skipped as bad records. The state (the stream position and the
// samples waiting) is small JSON, so a resumed run continues with the same batches.
class BucketBatcher {
 public:
  BucketBatcher(SampleStream& stream, BatcherOptions options);
  Batch next();
  nlohmann::json state() const;
  void restore(const nlohmann::json& state);  // throws Error on a state of other buckets or data

 private:
  struct Waiting {
    int64_t epoch;
    SampleKey where;
    Fitted fitted;
    torch::Tensor context, pooled;  // cached samples only (pooled: SDXL's)
    std::string caption, name;
  };
  void add(Sample sample);
  size_t bucket_of_cached(const Sample& sample) const;
  SampleStream& stream_;
  BatcherOptions options_;
  std::vector<std::vector<Waiting>> waiting_;  // per bucket
};

// Draws a BucketBatcher's batches on a background thread, up to `depth` ahead, so that reading,
// decoding and fitting images overlap the training step (as a DataLoader worker does). The
// batches and their order are exactly the batcher's; state() is the batcher's state after the
// last batch handed out (not after those read ahead), so a checkpoint resumes exactly. Depth 0
// reads in the caller's thread. An error of the batcher is thrown by the next() that would have
// returned its batch.
class BatchPrefetcher {
 public:
  // `batcher` is in the state to continue from (restore it first).
  BatchPrefetcher(BucketBatcher& batcher, int64_t depth);
  ~BatchPrefetcher();
  BatchPrefetcher(const BatchPrefetcher&) = delete;
  BatchPrefetcher& operator=(const BatchPrefetcher&) = delete;

  Batch next();
  const nlohmann::json& state() const { return state_; }

 private:
  void work();
  BucketBatcher& batcher_;
  size_t depth_;
  nlohmann::json state_;  // after the last batch handed out
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::pair<Batch, nlohmann::json>> ready_;  // each batch with the state after it
  std::exception_ptr error_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace lightning::data
