#include "eval/metrics.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "core/error.h"

namespace lightning::eval {

GaussianStats gaussian_stats(const torch::Tensor& features) {
  if (features.dim() != 2 || features.size(0) < 2)
    fail("FID: need at least 2 feature vectors [N, D], got {}", c10::str(features.sizes()));
  auto f = features.to(torch::kFloat64);
  GaussianStats s;
  s.count = f.size(0);
  s.mean = f.mean(0);
  auto centered = f - s.mean;
  s.cov = centered.t().mm(centered) / static_cast<double>(s.count - 1);
  return s;
}

namespace {
torch::Tensor psd_sqrt(const torch::Tensor& m) {
  auto [values, vectors] = torch::linalg_eigh(m);
  return vectors.mm(torch::diag(values.clamp_min(0).sqrt())).mm(vectors.t());
}
}  // namespace

double frechet_distance(const GaussianStats& a, const GaussianStats& b) {
  if (a.mean.numel() != b.mean.numel()) fail("FID: feature sizes differ");
  auto diff = (a.mean - b.mean).pow(2).sum().item<double>();
  auto root_a = psd_sqrt(a.cov);
  auto middle = root_a.mm(b.cov).mm(root_a);
  middle = (middle + middle.t()) / 2;
  auto trace_sqrt = torch::linalg_eigvalsh(middle).clamp_min(0).sqrt().sum().item<double>();
  double fid = diff + a.cov.trace().item<double>() + b.cov.trace().item<double>() - 2 * trace_sqrt;
  return std::max(fid, 0.0);
}

torch::Tensor random_crops_upsampled(const torch::Tensor& images, int64_t crop, uint64_t seed) {
  const int64_t n = images.size(0), h = images.size(2), w = images.size(3);
  if (crop < 1 || crop > h || crop > w) fail("crop size {} does not fit {}x{} images", crop, h, w);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto ys = torch::randint(0, h - crop + 1, {n}, gen, torch::kInt64);
  auto xs = torch::randint(0, w - crop + 1, {n}, gen, torch::kInt64);
  std::vector<torch::Tensor> crops;
  crops.reserve(static_cast<size_t>(n));
  auto ya = ys.accessor<int64_t, 1>();
  auto xa = xs.accessor<int64_t, 1>();
  for (int64_t i = 0; i < n; ++i)
    crops.push_back(images[i].slice(1, ya[i], ya[i] + crop).slice(2, xa[i], xa[i] + crop));
  auto stacked = torch::stack(crops).to(torch::kFloat32);
  return torch::nn::functional::interpolate(stacked, torch::nn::functional::InterpolateFuncOptions()
                                                         .size(std::vector<int64_t>{h, w})
                                                         .mode(torch::kBilinear)
                                                         .align_corners(false));
}

}  // namespace lightning::eval
