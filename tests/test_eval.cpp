// Evaluation: the Fréchet distance against closed forms and an independent formula, crops,
// the shipped classifier's accuracy, the shipped teacher's prompt accuracy, and the CLI.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "data/fashion_mnist.h"
#include "eval/classifier.h"
#include "eval/evaluate.h"
#include "eval/metrics.h"
#include "generate/pipeline.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace lightning;

TEST(Fid, ZeroForIdenticalStatsAndClosedFormForCommutingCovariances) {
  torch::manual_seed(0);
  auto f = torch::randn({200, 8}, torch::kFloat64);
  auto s = eval::gaussian_stats(f);
  EXPECT_NEAR(eval::frechet_distance(s, s), 0.0, 1e-9);
  // Unbiased covariance as numpy.cov.
  auto c = f - f.mean(0);
  EXPECT_LE(test::relative_error(s.cov, c.t().mm(c) / 199), 1e-12);

  // Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  eval::GaussianStats a, b;
  a.mean = torch::tensor({0.0, 1.0, 2.0}, torch::kFloat64);
  b.mean = torch::tensor({1.0, 1.0, 0.0}, torch::kFloat64);
  a.cov = torch::diag(torch::tensor({1.0, 4.0, 9.0}, torch::kFloat64));
  b.cov = torch::diag(torch::tensor({4.0, 1.0, 9.0}, torch::kFloat64));
  EXPECT_NEAR(eval::frechet_distance(a, b), 5.0 + 1.0 + 1.0 + 0.0, 1e-9);
}

TEST(Fid, MatchesTheTraceOfSqrtmOfTheProduct) {
  // pytorch-fid computes tr(sqrtm(S1 S2)); for PSD S1, S2 that is the sum of the square roots
  // of the (real, non-negative) eigenvalues of S1 S2: an independent route to the same number.
  torch::manual_seed(1);
  for (int trial = 0; trial < 3; ++trial) {
    auto x = torch::randn({300, 6}, torch::kFloat64);
    auto y =
        torch::randn({300, 6}, torch::kFloat64).mm(torch::randn({6, 6}, torch::kFloat64)) + 0.5;
    auto a = eval::gaussian_stats(x), b = eval::gaussian_stats(y);
    auto eig = torch::linalg_eigvals(a.cov.mm(b.cov));
    double tr_sqrt = torch::real(torch::sqrt(eig)).sum().item<double>();
    double expected = (a.mean - b.mean).pow(2).sum().item<double>() + a.cov.trace().item<double>() +
                      b.cov.trace().item<double>() - 2 * tr_sqrt;
    EXPECT_NEAR(eval::frechet_distance(a, b), expected, 1e-8 * std::max(1.0, expected));
  }
}

TEST(Fid, RandomCropsAreDeterministicAndFullSize) {
  auto images = torch::rand({5, 1, 32, 32}) * 2 - 1;
  auto a = eval::random_crops_upsampled(images, 16, 3);
  auto b = eval::random_crops_upsampled(images, 16, 3);
  EXPECT_EQ(a.sizes(), images.sizes());
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_FALSE(torch::equal(a, eval::random_crops_upsampled(images, 16, 4)));
  // A full-size "crop" is the image itself.
  EXPECT_LE(test::relative_error(eval::random_crops_upsampled(images, 32, 0), images), 1e-6);
}

TEST(Classifier, ShippedWeightsReachNinetyPercentOnTheTestSplit) {
  auto classifier = eval::load_classifier(test::source_path("models/fmnist-classifier"));
  double accuracy = eval::test_accuracy(classifier, data::kFashionMnistDir);
  EXPECT_GE(accuracy, 0.90);
}

TEST(Eval, ShippedTeacherFollowsItsPrompts) {
  // A small regression check; docs/results.md has the 5,000-image numbers.
  auto classifier = eval::load_classifier(test::source_path("models/fmnist-classifier"));
  auto model = generate::load_model(test::source_path("models/fmnist-teacher"), {});
  eval::EvalOptions options;
  options.num_images = 50;
  auto reference = eval::reference_stats(classifier, options);
  auto row =
      eval::evaluate_model(model, classifier, reference, model.recommended.sampler,
                           model.recommended.steps, model.recommended.guidance_scale, options);
  EXPECT_GE(row.prompt_accuracy, 0.8);
  EXPECT_GT(row.fid, 0);
  EXPECT_GT(row.fid_patch, 0);
}

TEST(Cli, EvalPrintsATableAndWritesJsonLines) {
  const auto dir = test::temp_dir();
  auto r = test::run_lightning("eval --num-images 20 --steps 2 --sampler ddim --floor --out " +
                               dir + "/rows.jsonl --grid " + dir + "/grid.png");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("| ddim | 2 |"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("train split"), std::string::npos) << r.output;
  std::ifstream in(dir + "/rows.jsonl");
  int lines = 0;
  for (std::string line; std::getline(in, line);)
    ++lines;
  EXPECT_EQ(lines, 2);
  EXPECT_TRUE(fs::exists(dir + "/grid.png"));
  auto bad = test::run_lightning("eval --classifier /nonexistent --num-images 10");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
}
