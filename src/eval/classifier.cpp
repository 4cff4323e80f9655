#include "eval/classifier.h"

#include <filesystem>
#include <random>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/error.h"
#include "core/progress.h"
#include "data/fashion_mnist.h"
#include "io/files.h"
#include "io/json_config.h"
#include "io/state_dict.h"

namespace lightning::eval {
namespace fs = std::filesystem;

ClassifierConfig ClassifierConfig::from_json(const nlohmann::json& json, const std::string& file) {
  io::ConfigReader r(json, file);
  ClassifierConfig c;
  r.expect("model_type", "fashion_classifier");
  if (r.has("channels")) c.channels = r.require_int_list("channels");
  c.feature_dim = r.get_int("feature_dim", c.feature_dim);
  c.dropout = r.get_double("dropout", c.dropout);
  c.image_size = r.get_int("image_size", c.image_size);
  c.num_classes = r.get_int("num_classes", c.num_classes);
  r.refuse_unknown_keys();
  if (c.channels.empty()) r.fail_key("channels", "must not be empty");
  for (auto ch : c.channels)
    if (ch <= 0) r.fail_key("channels", "must be positive");
  if (c.image_size % (int64_t{1} << c.channels.size()) != 0)
    r.fail_key("image_size", "must be divisible by 2^len(channels)");
  if (c.feature_dim <= 0 || c.num_classes <= 0) r.fail_key("feature_dim", "must be positive");
  return c;
}

nlohmann::json ClassifierConfig::to_json() const {
  return {{"model_type", "fashion_classifier"}, {"channels", channels},
          {"feature_dim", feature_dim},         {"dropout", dropout},
          {"image_size", image_size},           {"num_classes", num_classes}};
}

FashionClassifierImpl::FashionClassifierImpl(const ClassifierConfig& c) : config(c) {
  body = torch::nn::Sequential();
  int64_t in = 1;
  for (auto ch : c.channels) {
    body->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(in, ch, 3).padding(1).bias(false)));
    body->push_back(torch::nn::BatchNorm2d(ch));
    body->push_back(torch::nn::ReLU());
    body->push_back(torch::nn::MaxPool2d(2));
    in = ch;
  }
  register_module("body", body);
  const int64_t side = c.image_size >> c.channels.size();
  fc = register_module("fc", torch::nn::Linear(in * side * side, c.feature_dim));
  drop = register_module("drop", torch::nn::Dropout(c.dropout));
  head = register_module("head", torch::nn::Linear(c.feature_dim, c.num_classes));
}

torch::Tensor FashionClassifierImpl::features(const torch::Tensor& pixels) {
  if (pixels.dim() != 4 || pixels.size(1) != 1 || pixels.size(2) != config.image_size ||
      pixels.size(3) != config.image_size)
    fail("classifier: expected images [B, 1, {0}, {0}], got {1}", config.image_size,
         c10::str(pixels.sizes()));
  return torch::relu(fc->forward(body->forward(pixels).flatten(1)));
}

torch::Tensor FashionClassifierImpl::logits_from_features(const torch::Tensor& f) {
  return head->forward(drop->forward(f));
}

FashionClassifier load_classifier(const std::string& dir) {
  const auto config_path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(config_path)) fail("{}: missing (not a classifier directory)", config_path);
  auto config = ClassifierConfig::from_json(io::read_json_file(config_path), config_path);
  FashionClassifier model(config);
  io::WeightFiles weights({(fs::path(dir) / "model.safetensors").string()});
  io::load_weights(*model, weights, {}, dir);
  model->eval();
  return model;
}

void save_classifier(FashionClassifier& model, const std::string& dir) {
  io::write_directory_atomic(dir, [&](const std::string& tmp) {
    io::write_json_file(tmp + "/config.json", model->config.to_json());
    io::save_weights(*model, tmp + "/model.safetensors");
  });
}

Judgement judge(FashionClassifier& model, const torch::Tensor& pixels, int64_t batch) {
  torch::NoGradGuard no_grad;
  model->eval();
  std::vector<torch::Tensor> feats, preds;
  for (int64_t s = 0; s < pixels.size(0); s += batch) {
    auto x = pixels.slice(0, s, std::min(pixels.size(0), s + batch)).to(torch::kFloat32);
    auto f = model->features(x);
    feats.push_back(f.to(torch::kFloat64));
    preds.push_back(model->logits_from_features(f).argmax(1));
  }
  return {torch::cat(feats), torch::cat(preds)};
}

double test_accuracy(FashionClassifier& model, const std::string& data_dir) {
  auto test = data::load_fashion_mnist(data::Split::kTest, data_dir);
  auto j = judge(model, data::to_model_pixels(test.images));
  return j.predicted.eq(test.labels).to(torch::kFloat64).mean().item<double>();
}

ClassifierRecipe ClassifierRecipe::from_json(const nlohmann::json& json, const std::string& file) {
  io::ConfigReader root(json, file);
  ClassifierRecipe r;
  r.file = file;
  root.expect("task", "classifier");
  auto section = [&](const std::string& key) {
    auto v = root.get_raw(key);
    if (v.is_null()) return nlohmann::json::object();
    if (!v.is_object()) root.fail_key(key, "expected a table");
    return v;
  };
  {
    io::ConfigReader m(section("model"), file + " [model]");
    r.name = m.get_string("name", r.name);
    auto cfg = m.get_raw("config");
    r.config = ClassifierConfig::from_json(
        cfg.is_null() ? nlohmann::json{{"model_type", "fashion_classifier"}} : cfg,
        file + " [model.config]");
    m.refuse_unknown_keys();
  }
  {
    io::ConfigReader d(section("data"), file + " [data]");
    d.expect("dataset", "fashion-mnist");
    r.data_dir = d.get_string("dir", data::kFashionMnistDir);
    r.hflip = d.get_bool("hflip", r.hflip);
    r.max_shift = d.get_int("max_shift", r.max_shift);
    d.refuse_unknown_keys();
  }
  {
    io::ConfigReader t(section("train"), file + " [train]");
    r.seed = static_cast<uint64_t>(t.get_int("seed", 0));
    r.epochs = t.get_int("epochs", r.epochs);
    r.batch_size = t.get_int("batch_size", r.batch_size);
    r.learning_rate = t.get_double("learning_rate", r.learning_rate);
    r.weight_decay = t.get_double("weight_decay", r.weight_decay);
    if (r.epochs < 1) t.fail_key("epochs", "must be >= 1");
    if (r.batch_size < 1) t.fail_key("batch_size", "must be >= 1");
    if (!(r.learning_rate > 0)) t.fail_key("learning_rate", "must be > 0");
    t.refuse_unknown_keys();
  }
  root.refuse_unknown_keys();
  return r;
}

double train_classifier(const ClassifierRecipe& recipe, const std::string& out_dir) {
  auto train = data::load_fashion_mnist(data::Split::kTrain, recipe.data_dir);
  const auto pixels = data::to_model_pixels(train.images);
  const int64_t n = train.size();
  torch::manual_seed(recipe.seed);
  FashionClassifier model(recipe.config);
  torch::optim::AdamW optimizer(
      model->parameters(),
      torch::optim::AdamWOptions(recipe.learning_rate).weight_decay(recipe.weight_decay));
  const int64_t steps_per_epoch = (n + recipe.batch_size - 1) / recipe.batch_size;
  const int64_t total = steps_per_epoch * recipe.epochs;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(recipe.seed + 1);
  std::mt19937_64 rng(recipe.seed + 2);
  ProgressBar bar("classifier", total, "step");
  double accuracy = 0;
  int64_t step = 0;
  for (int64_t epoch = 0; epoch < recipe.epochs; ++epoch) {
    model->train();
    auto perm = torch::randperm(n, gen, torch::kInt64);
    for (int64_t s = 0; s < n; s += recipe.batch_size, ++step) {
      auto idx = perm.slice(0, s, std::min(n, s + recipe.batch_size));
      auto x = pixels.index_select(0, idx);
      auto y = train.labels.index_select(0, idx);
      if (recipe.hflip) {
        auto flip = torch::rand({x.size(0)}, gen) < 0.5;
        x = torch::where(flip.view({-1, 1, 1, 1}), x.flip({3}), x);
      }
      if (recipe.max_shift > 0) {  // one random translation per batch, padding with black
        std::uniform_int_distribution<int64_t> shift(-recipe.max_shift, recipe.max_shift);
        int64_t dy = shift(rng), dx = shift(rng), m = recipe.max_shift;
        x = torch::constant_pad_nd(x, {m, m, m, m}, -1.0)
                .slice(2, m + dy, m + dy + x.size(2))
                .slice(3, m + dx, m + dx + x.size(3));
      }
      // Cosine learning rate over the whole run.
      double lr =
          recipe.learning_rate * 0.5 * (1 + std::cos(M_PI * step / static_cast<double>(total)));
      for (auto& g : optimizer.param_groups())
        static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
      auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      bar.update(step + 1, fmt::format("epoch {} loss {:.4f}", epoch + 1, loss.item<double>()));
    }
    accuracy = test_accuracy(model, recipe.data_dir);
    spdlog::info("classifier: epoch {}: test accuracy {:.2f}%", epoch + 1, accuracy * 100);
  }
  bar.finish();
  save_classifier(model, out_dir);
  return accuracy;
}

}  // namespace lightning::eval
