// PNG writing/reading with text metadata, pixel conversion and grids.
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "io/image.h"
#include "test_util.h"

namespace lightning {
namespace {

using ::testing::HasSubstr;

TEST(Png, RoundTripsPixelsAndText) {
  const auto dir = test::temp_dir();
  for (int64_t channels : {1, 3, 4}) {
    auto image = torch::randint(0, 256, {channels, 5, 7}, torch::kUInt8);
    const auto path = dir + "/img" + std::to_string(channels) + ".png";
    io::write_png(path, image,
                  {{"parameters", "a photo of a sneaker\nSteps: 4, Sampler: Euler, Seed: 42"},
                   {"Software", "lightning.cpp"}});
    auto back = io::read_png(path);
    EXPECT_TRUE(torch::equal(back.pixels, image)) << channels;
    EXPECT_EQ(back.text.at("parameters"),
              "a photo of a sneaker\nSteps: 4, Sampler: Euler, Seed: 42");
    EXPECT_EQ(back.text.at("Software"), "lightning.cpp");
  }
  // No temporary file is left behind.
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    EXPECT_EQ(entry.path().extension(), ".png") << entry.path();
}

TEST(Png, BadInputsNameTheFile) {
  const auto dir = test::temp_dir();
  std::ofstream(dir + "/not.png") << "hello";
  try {
    io::read_png(dir + "/not.png");
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir + "/not.png: not a PNG file"));
  }
  // A truncated PNG.
  io::write_png(dir + "/ok.png", torch::zeros({3, 64, 64}, torch::kUInt8));
  std::ifstream in(dir + "/ok.png", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  std::ofstream(dir + "/cut.png", std::ios::binary).write(bytes.data(), bytes.size() / 2);
  EXPECT_THROW(io::read_png(dir + "/cut.png"), Error);
  EXPECT_THROW(io::write_png(dir + "/two.png", torch::zeros({2, 4, 4}, torch::kUInt8)), Error);
  EXPECT_THROW(io::write_png(dir + "/float.png", torch::zeros({3, 4, 4})), Error);
  EXPECT_THROW(io::write_png(dir + "/missing-dir/x.png", torch::zeros({3, 4, 4}, torch::kUInt8)),
               Error);
}

TEST(Png, FailedWriteKeepsTheOldFile) {
  const auto dir = test::temp_dir();
  io::write_png(dir + "/a.png", torch::full({1, 2, 2}, 7, torch::kUInt8));
  EXPECT_THROW(io::write_png(dir + "/a.png", torch::zeros({5, 2, 2}, torch::kUInt8)), Error);
  EXPECT_EQ(io::read_png(dir + "/a.png").pixels[0][0][0].item<int>(), 7);
}

TEST(Image, ModelPixelsToUint8) {
  auto x = torch::tensor({-1.5f, -1.0f, 0.0f, 1.0f, 2.0f}).view({1, 1, 5});
  auto u = io::to_uint8_image(x);
  EXPECT_EQ(u.scalar_type(), torch::kUInt8);
  EXPECT_EQ(u.flatten()[0].item<int>(), 0);
  EXPECT_EQ(u.flatten()[2].item<int>(), 128);  // 127.5 rounds to even-or-up: 128
  EXPECT_EQ(u.flatten()[3].item<int>(), 255);
  EXPECT_EQ(u.flatten()[4].item<int>(), 255);
}

TEST(Image, GridTilesRowMajor) {
  auto images =
      torch::arange(1, 6, torch::kUInt8).view({5, 1, 1, 1}).expand({5, 1, 2, 3}).contiguous();
  auto grid = io::make_grid(images, /*cols=*/0, /*padding=*/1, /*pad_value=*/0);
  // ceil(sqrt(5)) = 3 columns, 2 rows: [1, 2*(2+1)+1, 3*(3+1)+1]
  EXPECT_EQ(grid.sizes(), (std::vector<int64_t>{1, 7, 13}));
  EXPECT_EQ(grid[0][1][1].item<int>(), 1);
  EXPECT_EQ(grid[0][1][5].item<int>(), 2);
  EXPECT_EQ(grid[0][4][5].item<int>(), 5);
  EXPECT_EQ(grid[0][4][9].item<int>(), 0);  // the empty sixth tile stays padding
  EXPECT_EQ(grid[0][0][0].item<int>(), 0);
}

}  // namespace
}  // namespace lightning
