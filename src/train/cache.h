// `lightning cache`: encodes a data set once for training. Every usable image is fitted to its
// aspect-ratio bucket (centre crop), put into the model's space (the VAE's latent mean for latent
// models, the pixels for pixel-space ones), and its caption text-encoded; the results are written
// as WebDataset tar shards whose samples are small safetensors members (x, context, time_ids and,
// for SDXL, pooled: the pooled text embeddings) with the caption beside them. A recipe's [data]
// dataset = "cache" then reads these shards through the same stream as images (shuffle buffer,
// ranks, exact resume) and skips the encoders.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "data/stream.h"
#include "generate/pipeline.h"

namespace lightning::train {

// The cache directory's index, cache.json.
constexpr const char* kCacheIndex = "cache.json";

struct CacheOptions {
  std::string out_dir;
  int64_t shard_size = 1000;             // samples per tar shard
  int64_t text_batch = 32;               // captions encoded at once
  torch::Dtype dtype = torch::kFloat16;  // of x and context (time_ids are int64)
  int64_t resolution = 0;                // bucket resolution (0: the model's sample size)
  double max_aspect = 1.0;
  int64_t bucket_step = 0;  // the buckets' sides step (0: automatic, data::bucket_step)
};

struct CacheResult {
  int64_t samples = 0, skipped = 0, shards = 0;
  nlohmann::json index;  // what cache.json holds
};

// The encoders' probe, cache-probe.safetensors: what the model's VAE makes of a fixed 64x64 test
// pattern ("x", latent models only) and its text encoders of a fixed caption ("context", and
// "pooled" for SDXL), so that a cache can be checked against the model that reads it.
constexpr const char* kCacheProbe = "cache-probe.safetensors";
std::map<std::string, torch::Tensor> encoder_probe(const generate::TextToImageModel& model);
// A cache is refused when a probe tensor differs by more than this (relative L2 norm): above what
// f16 weights of the same model change (a test checks it), far below a changed scaling factor.
constexpr double kCacheProbeTolerance = 0.05;

// Reads one epoch of `source` (file order, one rank) and writes the cache directory atomically
// (an existing one is replaced only when the new one is complete, and only if it is a cache:
// another non-empty directory is refused, as is one that holds the source data). `model_name` is
// recorded.
CacheResult write_cache(const generate::TextToImageModel& model, const std::string& model_name,
                        const data::DataSource& source, const CacheOptions& options);

// Reads `dir`/cache.json and checks it was made for a model like `model`: input channels, sizes,
// and the encoders' probe (the same VAE with the same scaling, the same text encoders); returns
// the index. Throws Error naming the file and the mismatch.
nlohmann::json read_cache_index(const std::string& dir, const generate::TextToImageModel& model);

}  // namespace lightning::train
