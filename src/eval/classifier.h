// The project's Fashion-MNIST classifier: the judge of `lightning eval`. Its class predictions
// give prompt accuracy and its penultimate features stand in for Inception's in FID (a
// domain-specific feature space, as FID on MNIST-like data is usually computed).
//
// Architecture (input: model pixels [B, 1, 32, 32] in [-1, 1], as data::to_model_pixels):
//   per entry of `channels` (default 32, 64, 128): conv 3x3 -> BatchNorm -> ReLU -> max-pool 2,
//   then flatten -> Linear(feature_dim) -> ReLU
//   (the features) -> dropout -> Linear(10).
// Stored as a directory: config.json + model.safetensors (models/fmnist-classifier).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>
#include <nlohmann/json.hpp>

namespace lightning::eval {

struct ClassifierConfig {
  std::vector<int64_t> channels{32, 64, 128};
  int64_t feature_dim = 128;
  double dropout = 0.3;
  int64_t image_size = 32;
  int64_t num_classes = 10;
  static ClassifierConfig from_json(const nlohmann::json& json, const std::string& file);
  nlohmann::json to_json() const;
};

class FashionClassifierImpl : public torch::nn::Module {
 public:
  explicit FashionClassifierImpl(const ClassifierConfig& config);
  // Penultimate features [B, feature_dim] (after ReLU).
  torch::Tensor features(const torch::Tensor& pixels);
  // Class logits from features.
  torch::Tensor logits_from_features(const torch::Tensor& features);
  torch::Tensor forward(const torch::Tensor& pixels) {
    return logits_from_features(features(pixels));
  }

  ClassifierConfig config;
  torch::nn::Sequential body{nullptr};
  torch::nn::Linear fc{nullptr}, head{nullptr};
  torch::nn::Dropout drop{nullptr};
};
TORCH_MODULE(FashionClassifier);

FashionClassifier load_classifier(const std::string& dir);
void save_classifier(FashionClassifier& model, const std::string& dir);

// Features and predicted classes of many images, in batches, in eval mode without gradients.
struct Judgement {
  torch::Tensor features;   // [N, feature_dim] float64
  torch::Tensor predicted;  // [N] int64
};
Judgement judge(FashionClassifier& model, const torch::Tensor& pixels, int64_t batch = 500);

// Training recipe (recipes/fmnist-classifier.toml, `lightning train` with task = "classifier").
struct ClassifierRecipe {
  std::string file, name = "fmnist-classifier", data_dir;
  ClassifierConfig config;
  uint64_t seed = 0;
  int64_t epochs = 4, batch_size = 128;
  double learning_rate = 2e-3, weight_decay = 1e-4;
  int64_t max_shift = 2;  // random translation augmentation, in pixels
  bool hflip = true;
  static ClassifierRecipe from_json(const nlohmann::json& json, const std::string& file);
};

// Trains on the train split, reports test accuracy after each epoch, saves `out_dir`/model
// and returns the final test accuracy.
double train_classifier(const ClassifierRecipe& recipe, const std::string& out_dir);

// Test-split accuracy of a classifier.
double test_accuracy(FashionClassifier& model, const std::string& data_dir);

}  // namespace lightning::eval
