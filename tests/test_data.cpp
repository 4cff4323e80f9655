// Fashion-MNIST reading (IDX, gzip), captions and model pixels.
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <zlib.h>

#include "core/error.h"
#include "data/fashion_mnist.h"
#include "test_util.h"

namespace lightning {
namespace {

using ::testing::HasSubstr;

void write_bytes(const std::string& path, const std::string& bytes, bool gzip) {
  if (gzip) {
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(f);
  } else {
    std::ofstream(path, std::ios::binary).write(bytes.data(), bytes.size());
  }
}

std::string idx_header(std::vector<uint32_t> dims, uint8_t type = 0x08) {
  std::string h = {0, 0, static_cast<char>(type), static_cast<char>(dims.size())};
  for (auto d : dims) {
    for (int s = 24; s >= 0; s -= 8)
      h.push_back(static_cast<char>((d >> s) & 0xff));
  }
  return h;
}

TEST(Idx, ReadsPlainAndGzip) {
  const auto dir = test::temp_dir();
  const std::string data = idx_header({2, 3}) + std::string("\x01\x02\x03\x04\x05\xff", 6);
  for (bool gzip : {false, true}) {
    const auto path = dir + (gzip ? "/a.gz" : "/a");
    write_bytes(path, data, gzip);
    auto t = data::read_idx(path);
    ASSERT_EQ(t.sizes(), (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(t[1][2].item<int>(), 255);
    EXPECT_EQ(t[0][0].item<int>(), 1);
  }
}

TEST(Idx, RefusesCorruptFilesNamingThem) {
  const auto dir = test::temp_dir();
  auto expect_error = [&](const std::string& bytes, const std::string& needle) {
    const auto path = dir + "/bad.gz";
    write_bytes(path, bytes, true);
    try {
      data::read_idx(path);
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(path));
      EXPECT_THAT(e.what(), HasSubstr(needle));
    }
  };
  expect_error(std::string("\x01\x00\x08\x01", 4), "bad magic");
  expect_error(idx_header({2}, 0x0d) + std::string(8, 'x'), "not supported");
  expect_error(idx_header({4}) + "ab", "truncated");
  expect_error(idx_header({2}) + "abc", "trailing bytes");
  expect_error(std::string("\x00\x00", 2), "truncated IDX header");
  EXPECT_THROW(data::read_idx(dir + "/missing.gz"), Error);
}

TEST(FashionMnist, LoadsBothSplits) {
  if (!std::filesystem::exists(std::string(data::kFashionMnistDir) + "/t10k-labels-idx1-ubyte.gz"))
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  auto test_split = data::load_fashion_mnist(data::Split::kTest);
  EXPECT_EQ(test_split.size(), 10000);
  EXPECT_EQ(test_split.images.sizes(), (std::vector<int64_t>{10000, 28, 28}));
  // The test split is balanced: 1,000 images per class.
  auto counts = torch::bincount(test_split.labels);
  EXPECT_TRUE(torch::equal(counts, torch::full({10}, 1000, torch::kInt64)));
  auto train = data::load_fashion_mnist(data::Split::kTrain);
  EXPECT_EQ(train.size(), 60000);
  EXPECT_EQ(train.labels[0].item<int64_t>(), 9);  // the first training image is an ankle boot
}

TEST(FashionMnist, CaptionsNameTheClass) {
  EXPECT_EQ(data::class_prompt(7), "a photo of a sneaker");
  EXPECT_EQ(data::caption(9, 2), "an ankle boot, product photo");
  EXPECT_EQ(data::caption(7, 1), "a sneaker");
  std::mt19937_64 rng(0);
  for (int i = 0; i < 50; ++i)
    EXPECT_THAT(data::random_caption(1, rng), HasSubstr("trousers"));
  EXPECT_THROW(data::caption(10, 0), Error);
  EXPECT_EQ(data::fashion_mnist_class_names()[9], "Ankle boot");
}

TEST(FashionMnist, ModelPixelsArePaddedToMinusOne) {
  auto images = torch::full({2, 28, 28}, 255, torch::kUInt8);
  auto x = data::to_model_pixels(images);
  EXPECT_EQ(x.sizes(), (std::vector<int64_t>{2, 1, 32, 32}));
  EXPECT_FLOAT_EQ(x[0][0][0][0].item<float>(), -1.0f);
  EXPECT_FLOAT_EQ(x[0][0][16][16].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(
      data::to_model_pixels(torch::zeros({1, 28, 28}, torch::kUInt8)).max().item<float>(), -1.0f);
}

}  // namespace
}  // namespace lightning
