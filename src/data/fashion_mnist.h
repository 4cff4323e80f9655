// Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 70,000 28x28 greyscale product photos in 10
// classes, read from the IDX files of Debian's dataset-fashion-mnist package, with text captions
// made from the class names for text-to-image training.
#pragma once

#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <torch/types.h>

namespace lightning::data {

// Where Debian's dataset-fashion-mnist package puts the files.
constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";
constexpr int kFashionMnistClasses = 10;

// Reads an IDX file (LeCun's format: 0x00 0x00 <type> <rank>, rank big-endian u32 dimensions,
// then the data), gzip-compressed or not. Only unsigned-byte data (type 0x08) is supported,
// which is what the (Fashion-)MNIST files hold. Returns a uint8 tensor of the stored shape.
// Throws Error naming the file on a bad magic number, unsupported type, truncation or
// trailing bytes.
torch::Tensor read_idx(const std::string& path);

enum class Split { kTrain, kTest };

struct FashionMnist {
  torch::Tensor images;  // [N, 28, 28] uint8, 0 = black background
  torch::Tensor labels;  // [N] int64 in [0, 10)
  int64_t size() const { return labels.size(0); }
};

// Loads one split from `dir` (train: 60,000 images, test: 10,000), checking that image and
// label counts agree and labels are in range.
FashionMnist load_fashion_mnist(Split split, const std::string& dir = kFashionMnistDir);

// The dataset's class names ("T-shirt/top", ..., "Ankle boot").
const std::array<std::string, kFashionMnistClasses>& fashion_mnist_class_names();

// Caption templates, "{}" standing for the item with its article ("a sneaker",
// "an ankle boot"): "a photo of {}", "{}", "{}, product photo", ...
const std::vector<std::string>& caption_templates();

// The caption of class `label` with template `template_index`.
std::string caption(int64_t label, size_t template_index);

// A caption with a template drawn uniformly from `rng`.
std::string random_caption(int64_t label, std::mt19937_64& rng);

// The canonical prompt of a class, used for generation and prompt-accuracy evaluation:
// "a photo of a sneaker".
std::string class_prompt(int64_t label);

// Images as model input: uint8 [N, 28, 28] -> float [N, 1, 32, 32] in [-1, 1], zero-padded
// (black, i.e. -1) by 2 pixels on each side so that the size halves cleanly three times.
torch::Tensor to_model_pixels(const torch::Tensor& images);

}  // namespace lightning::data
