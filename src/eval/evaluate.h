// `lightning eval`: how good a Fashion-MNIST text-to-image model is, judged by the project's
// classifier (eval/classifier.h):
//  - FID: Fréchet distance between classifier features of N generated images (classes
//    balanced: image i is prompted with class i mod 10) and of the test split;
//  - FID-patch (detail): the same on one random crop per image, upsampled to full size, against
//    crops of the test split (the stand-in for the paper's FID-Patch);
//  - prompt accuracy: the fraction of generated images classified as their prompt's class.
// The floor row compares N train-split images with the test split the same way.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "eval/classifier.h"
#include "eval/metrics.h"
#include "generate/pipeline.h"

namespace lightning::eval {

struct EvalOptions {
  int64_t num_images = 5000;
  uint64_t seed = 0;     // image i uses seed + i; crops use seed too
  int64_t batch = 250;   // images per generation batch
  int64_t crop = 16;     // FID-patch crop size (of 32)
  std::string data_dir;  // Fashion-MNIST (default: the Debian package's)
};

// Statistics of the test split: full images and crops.
struct Reference {
  GaussianStats full, patch;
};
Reference reference_stats(FashionClassifier& classifier, const EvalOptions& options);

struct EvalRow {
  std::string what;  // "euler", "ddim" or "train split"
  int64_t steps = 0;
  double guidance = 0;
  int64_t images = 0;
  double fid = 0, fid_patch = 0, prompt_accuracy = 0;
  double seconds = 0;  // generation time
  nlohmann::json to_json() const;
};

// Metrics of already generated images [N, 1, 32, 32] in [-1, 1] whose prompts had `classes`.
EvalRow score_images(FashionClassifier& classifier, const Reference& reference,
                     const torch::Tensor& images, const torch::Tensor& classes,
                     const EvalOptions& options);

// Generates N images with the given settings and scores them. `images_out`, when not null,
// receives the generated images.
EvalRow evaluate_model(const generate::TextToImageModel& model, FashionClassifier& classifier,
                       const Reference& reference, diffusion::SamplerKind sampler, int64_t steps,
                       double guidance, const EvalOptions& options,
                       torch::Tensor* images_out = nullptr);

// The floor: N random train-split images against the test split.
EvalRow evaluate_floor(FashionClassifier& classifier, const Reference& reference,
                       const EvalOptions& options);

}  // namespace lightning::eval
