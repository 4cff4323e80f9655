#include "eval/evaluate.h"

#include <chrono>
#include <memory>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "core/error.h"
#include "core/progress.h"
#include "data/fashion_mnist.h"

namespace lightning::eval {

nlohmann::json EvalRow::to_json() const {
  return {{"what", what},
          {"steps", steps},
          {"guidance", guidance},
          {"images", images},
          {"fid", fid},
          {"fid_patch", fid_patch},
          {"prompt_accuracy", prompt_accuracy},
          {"seconds", seconds}};
}

Reference reference_stats(FashionClassifier& classifier, const EvalOptions& options) {
  auto test = data::load_fashion_mnist(
      data::Split::kTest, options.data_dir.empty() ? data::kFashionMnistDir : options.data_dir);
  auto pixels = data::to_model_pixels(test.images);
  Reference r;
  r.full = gaussian_stats(judge(classifier, pixels).features);
  r.patch = gaussian_stats(
      judge(classifier, random_crops_upsampled(pixels, options.crop, options.seed + 1)).features);
  return r;
}

EvalRow score_images(FashionClassifier& classifier, const Reference& reference,
                     const torch::Tensor& images, const torch::Tensor& classes,
                     const EvalOptions& options) {
  EvalRow row;
  row.images = images.size(0);
  auto j = judge(classifier, images);
  row.fid = frechet_distance(gaussian_stats(j.features), reference.full);
  row.prompt_accuracy = j.predicted.eq(classes).to(torch::kFloat64).mean().item<double>();
  auto crops = random_crops_upsampled(images, options.crop, options.seed + 2);
  row.fid_patch =
      frechet_distance(gaussian_stats(judge(classifier, crops).features), reference.patch);
  return row;
}

EvalRow evaluate_model(const generate::TextToImageModel& model, FashionClassifier& classifier,
                       const Reference& reference, diffusion::SamplerKind sampler, int64_t steps,
                       double guidance, const EvalOptions& options, torch::Tensor* images_out) {
  if (options.num_images < 2) fail_usage("--num-images must be >= 2");
  generate::GenerateRequest req;
  auto classes =
      torch::arange(options.num_images, torch::kInt64).remainder(data::kFashionMnistClasses);
  for (int64_t i = 0; i < options.num_images; ++i)
    req.prompts.push_back(data::class_prompt(i % data::kFashionMnistClasses));
  req.steps = steps;
  req.guidance_scale = guidance;
  req.sampler = sampler;
  req.seed = options.seed;
  req.max_batch = options.batch;
  const auto resolved = generate::resolve_request(model, req);
  std::unique_ptr<ProgressBar> bar;
  auto t0 = std::chrono::steady_clock::now();
  auto label = fmt::format("{} {} steps cfg {:g}", diffusion::to_string(sampler), steps, guidance);
  auto images = generate::generate(model, resolved, [&](int64_t done, int64_t total) {
    if (!bar) bar = std::make_unique<ProgressBar>(label, total, "step");
    bar->update(done);
  });
  if (bar) bar->finish();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto row = score_images(classifier, reference, images.clamp(-1, 1), classes, options);
  row.what = diffusion::to_string(sampler);
  row.steps = resolved.steps;
  row.guidance = *resolved.guidance_scale;
  row.seconds = seconds;
  if (images_out) *images_out = images;
  return row;
}

EvalRow evaluate_floor(FashionClassifier& classifier, const Reference& reference,
                       const EvalOptions& options) {
  auto train = data::load_fashion_mnist(
      data::Split::kTrain, options.data_dir.empty() ? data::kFashionMnistDir : options.data_dir);
  const int64_t n = std::min(options.num_images, train.size());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  auto idx = torch::randperm(train.size(), gen, torch::kInt64).slice(0, 0, n);
  auto row =
      score_images(classifier, reference, data::to_model_pixels(train.images.index_select(0, idx)),
                   train.labels.index_select(0, idx), options);
  row.what = "train split";
  return row;
}

}  // namespace lightning::eval
