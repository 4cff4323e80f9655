// The training batches of a distillation run (distill/trainer.h): the Fashion-MNIST train split
// held in memory with its class captions encoded once, or streamed data (WebDataset shards, an
// image folder, a `lightning cache`) that each rank reads from its own shards in aspect-ratio
// buckets, with captions encoded as they arrive (a cache holds them encoded already).
//
// Every random draw is of the global batch, from a generator seeded per global iteration, and
// each rank keeps its rows: any number of ranks sees the numbers one process sees.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include <torch/types.h>
#include <nlohmann/json.hpp>

#include "data/buckets.h"
#include "data/stream.h"
#include "distill/objectives.h"
#include "train/train_util.h"

namespace lightning::dist {
class Group;
}

namespace lightning::generate {
struct TextToImageModel;
}

namespace lightning::distill {

struct DistillRecipe;

// This rank's rows [first, first + count) of a global batch of `global` rows.
struct RankRows {
  int64_t global = 0, count = 0, first = 0;
  RankRows(int64_t global_batch, const dist::Group& group);
  torch::Tensor of(const torch::Tensor& global_rows) const {
    return global_rows.narrow(0, first, count);
  }
};

// One iteration's batch: this rank's rows, on the training device.
struct TrainingBatch {
  torch::Tensor x0;  // [rows, C, H, W]: pixels, or the VAE's latent means for latent models
  // The captions' encodings; for SDXL also the pooled embeddings and the real crop's time ids.
  Conditioning conditioning;
  std::optional<double> wait_s;  // streamed data: seconds spent waiting for the reader thread
};

class TrainingBatches {
 public:
  // Opens the recipe's data for this rank and encodes what is encoded once (Fashion-MNIST's
  // captions, the empty prompt) with `teacher`'s frozen text encoders. `resume_file` (the
  // checkpoint's data.json, or "" when starting) restores streamed data's position.
  TrainingBatches(const DistillRecipe& recipe, const generate::TextToImageModel& teacher,
                  const dist::Group& group, const torch::Device& device,
                  const std::string& resume_file);
  TrainingBatches(const TrainingBatches&) = delete;
  TrainingBatches& operator=(const TrainingBatches&) = delete;

  bool streamed() const { return prefetcher_.has_value(); }
  const RankRows& rows() const { return rows_; }
  // The smallest image side, in pixels, that training sees (discriminator heads need enough).
  int64_t smallest_side() const { return smallest_side_; }
  // The unconditional branch of classifier-free guidance: "" encoded (zeros for SDXL), one row,
  // with the time ids of `batch`.
  Conditioning unconditional(const TrainingBatch& batch) const;

  // The batch of global iteration `g`. Fashion-MNIST draws its caption templates from
  // `generator`; streamed data encodes its captions and images with `teacher` (the stage's).
  TrainingBatch next(int64_t g, at::Generator& generator, generate::TextToImageModel& teacher);

  // Streamed data: every rank's position, for rank 0's checkpoint (a collective: every rank
  // calls it); null for Fashion-MNIST.
  nlohmann::json gather_positions(const dist::Group& group) const;
  // Streamed data: this rank's epoch, into a metrics line.
  void add_position(nlohmann::json& line) const;
  // Streamed data: this rank's bad records skipped and damaged shards so far ({0, 0} otherwise).
  std::array<double, 2> data_faults() const;

 private:
  TrainingBatch next_streamed(generate::TextToImageModel& teacher);

  const DistillRecipe& recipe_;
  torch::Device device_;
  RankRows rows_;
  int64_t smallest_side_ = 0;
  Conditioning empty_;  // context and pooled of ""
  // Fashion-MNIST, in memory.
  torch::Tensor pixels_, labels_;
  torch::Tensor caption_context_;  // [10 classes * templates, L, D]
  int64_t templates_ = 0;
  std::optional<train::EpochSampler> sampler_;
  // Streamed data: each rank reads its own shards into batches from one bucket.
  std::optional<data::SampleStream> stream_;
  std::optional<data::BucketBatcher> batcher_;
  std::optional<data::BatchPrefetcher> prefetcher_;  // reads ahead from batcher_
};

}  // namespace lightning::distill
