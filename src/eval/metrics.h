// Distribution metrics in a feature space: Fréchet distance between Gaussians fitted to two
// feature sets (FID, Heusel et al. 2017), and the random-crop variant that stands in for
// SDXL-Lightning's FID-Patch (METHOD.md: FID on crops, measuring detail rather than layout).
#pragma once

#include <cstdint>

#include <torch/types.h>

namespace lightning::eval {

struct GaussianStats {
  torch::Tensor mean;  // [D] float64
  torch::Tensor cov;   // [D, D] float64, unbiased (N - 1), as numpy.cov / pytorch-fid
  int64_t count = 0;
};

// Mean and covariance of features [N, D] (N >= 2).
GaussianStats gaussian_stats(const torch::Tensor& features);

// ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64 via symmetric
// eigendecompositions (negative eigenvalues from rounding are clamped to 0), which equals
// pytorch-fid's tr(sqrtm(S1 S2)) for PSD matrices without its complex-valued detour.
double frechet_distance(const GaussianStats& a, const GaussianStats& b);

// One random crop of `crop` x `crop` pixels per image (positions drawn from `seed`), resized
// back to the full H x W with bilinear interpolation: [N, C, H, W] -> [N, C, H, W].
torch::Tensor random_crops_upsampled(const torch::Tensor& images, int64_t crop, uint64_t seed);

}  // namespace lightning::eval
