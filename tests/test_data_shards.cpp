// Data at scale: brace patterns, WebDataset tar shards, image folders, image codecs, the sample
// stream (ranks, shuffle buffer, bad records, exact resume) and aspect-ratio buckets.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
// jpeglib.h needs FILE and size_t declared first.
#include <jpeglib.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "data/buckets.h"
#include "data/shards.h"
#include "data/stream.h"
#include "io/image_codecs.h"
#include "test_util.h"

namespace lightning {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A smooth test image with distinct values per channel, uint8 [C, H, W].
torch::Tensor test_image(int64_t c, int64_t h, int64_t w, int64_t salt = 0) {
  auto y = torch::arange(h).view({1, h, 1}), x = torch::arange(w).view({1, 1, w});
  auto ch = torch::arange(c).view({c, 1, 1});
  return ((y * 7 + x * 3 + ch * 50 + salt * 11) % 256)
      .to(torch::kUInt8)
      .expand({c, h, w})
      .contiguous();
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A shard of `n` samples "s<first + i>" with PNG images of size h x w (or given sizes) and captions
// "caption <first + i>".
void write_shard(const std::string& path, int64_t first, int64_t n, int64_t h = 16,
                 int64_t w = 16) {
  data::TarShardWriter tar(path);
  for (int64_t i = first; i < first + n; ++i) {
    const std::string key = fmt::format("s{:05d}", i);
    tar.add(key + ".png", io::encode_png(test_image(3, h + (i % 3) * 8, w, i)));
    tar.add(key + ".txt", fmt::format("caption {}", i));
  }
  tar.close();
}

// `shards` shards "<dir>/<prefix>-<i>.tar" of `per_shard` samples each (numbered on across
// shards), and a data source reading them through a shuffle buffer of `buffer`.
data::DataSource write_shards(const std::string& dir, const std::string& prefix, int shards,
                              int64_t per_shard, int64_t buffer, uint64_t seed) {
  for (int s = 0; s < shards; ++s)
    write_shard(fmt::format("{}/{}-{}.tar", dir, prefix, s), s * per_shard, per_shard);
  data::DataSource source;
  source.shards = fmt::format("{}/{}-{{0..{}}}.tar", dir, prefix, shards - 1);
  source.shuffle_buffer = buffer;
  source.seed = seed;
  return source;
}

TEST(Braces, ExpandsRangesAndAlternatives) {
  EXPECT_THAT(data::expand_braces("d/a-{000..003}.tar"),
              ElementsAre("d/a-000.tar", "d/a-001.tar", "d/a-002.tar", "d/a-003.tar"));
  EXPECT_THAT(data::expand_braces("{a,b}{1..2}"), ElementsAre("a1", "a2", "b1", "b2"));
  EXPECT_THAT(data::expand_braces("x{y,{z,w}}"), ElementsAre("xy", "xz", "xw"));
  EXPECT_THAT(data::expand_braces("{0..6..3}"), ElementsAre("0", "3", "6"));
  EXPECT_THAT(data::expand_braces("{3..1}"), ElementsAre("3", "2", "1"));
  EXPECT_THAT(data::expand_braces("{8..10}"), ElementsAre("8", "9", "10"));
  EXPECT_THAT(data::expand_braces("plain.tar"), ElementsAre("plain.tar"));
  EXPECT_THAT(data::expand_shard_list("a{0..1}.tar :: b.tar"),
              ElementsAre("a0.tar", "a1.tar", "b.tar"));
  for (const char* bad : {"a{b", "a}b", "{1..x}", "{0..4..0}"}) {
    try {
      data::expand_braces(bad);
      ADD_FAILURE() << bad;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(bad));
    }
  }
  EXPECT_THROW(data::expand_shard_list(" :: "), Error);
}

TEST(ImageCodecs, DecodePngJpegWebp) {
  const auto rgb = test_image(3, 24, 40), grey = test_image(1, 24, 40);
  EXPECT_TRUE(torch::equal(io::decode_image(io::encode_png(rgb), "a"), rgb));
  EXPECT_TRUE(torch::equal(io::decode_image(io::encode_png(grey), "a"), grey));
  EXPECT_TRUE(torch::equal(io::decode_image(io::encode_webp_lossless(rgb), "a"), rgb));
  // JPEG is lossy: a smooth image (no wrap-around edges) comes back within a few levels.
  const auto smooth =
      (torch::arange(24).view({1, 24, 1}) * 2 + torch::arange(40).view({1, 1, 40}) * 4 +
       torch::arange(3).view({3, 1, 1}) * 20)
          .to(torch::kUInt8)
          .contiguous();
  const auto jpeg = io::decode_image(io::encode_jpeg(smooth, 95), "a");
  ASSERT_EQ(jpeg.sizes(), smooth.sizes());
  EXPECT_LT((jpeg.to(torch::kFloat32) - smooth.to(torch::kFloat32)).abs().mean().item<float>(),
            2.0f);
  EXPECT_EQ(io::decode_image(io::encode_jpeg(grey), "a").size(0), 1);
  EXPECT_EQ(io::sniff_image_format(io::encode_webp_lossless(rgb)), io::ImageFormat::kWebp);
  // Damage: every format refuses truncated or foreign bytes with a line naming the image.
  for (const auto& bytes :
       {io::encode_png(rgb), io::encode_jpeg(rgb), io::encode_webp_lossless(rgb)}) {
    try {
      io::decode_image(bytes.substr(0, bytes.size() / 2), "shard.tar:k1");
      ADD_FAILURE() << "truncated " << io::to_string(io::sniff_image_format(bytes));
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("shard.tar:k1"));
    }
  }
  EXPECT_THROW(io::decode_image("GIF89a....", "x"), Error);
  // Luma conversion of RGB; grey repeated to RGB.
  EXPECT_EQ(io::to_channels(grey, 3).size(0), 3);
  const auto white = torch::full({3, 2, 2}, 255, torch::kUInt8);
  EXPECT_EQ(io::to_channels(white, 1).min().item<int>(), 255);
}

// A CMYK JPEG of `stored` (uint8 [4, H, W], the values as the file stores them) in `space`
// (JCS_CMYK or JCS_YCCK), with an Adobe marker (as libjpeg writes one) or without.
std::string encode_cmyk_jpeg(const torch::Tensor& stored, J_COLOR_SPACE space, bool adobe = true) {
  jpeg_compress_struct info{};
  jpeg_error_mgr error{};
  info.err = jpeg_std_error(&error);
  jpeg_create_compress(&info);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&info, &buffer, &size);
  info.image_height = static_cast<JDIMENSION>(stored.size(1));
  info.image_width = static_cast<JDIMENSION>(stored.size(2));
  info.input_components = 4;
  info.in_color_space = JCS_CMYK;
  jpeg_set_defaults(&info);
  jpeg_set_colorspace(&info, space);
  info.write_Adobe_marker = adobe ? TRUE : FALSE;
  jpeg_set_quality(&info, 95, TRUE);
  jpeg_start_compress(&info, TRUE);
  const auto hwc = stored.permute({1, 2, 0}).contiguous();
  while (info.next_scanline < info.image_height) {
    JSAMPROW row = hwc.data_ptr<uint8_t>() + info.next_scanline * info.image_width * 4;
    jpeg_write_scanlines(&info, &row, 1);
  }
  jpeg_finish_compress(&info);
  jpeg_destroy_compress(&info);
  std::string out(reinterpret_cast<const char*>(buffer), size);
  std::free(buffer);
  return out;
}

TEST(ImageCodecs, CmykJpegsAreReadAsPillowReadsThem) {
  // Adobe files store the inks inverted: stored (R, G, B, 255) is those colours with no black
  // ink; stored K = 128 darkens them to 128/255.
  const auto smooth =
      (torch::arange(24).view({1, 24, 1}) * 2 + torch::arange(40).view({1, 1, 40}) * 4 +
       torch::arange(3).view({3, 1, 1}) * 20)
          .to(torch::kUInt8);
  for (int64_t k : {255, 128})
    for (J_COLOR_SPACE space : {JCS_CMYK, JCS_YCCK}) {
      SCOPED_TRACE(fmt::format("K {} space {}", k, static_cast<int>(space)));
      const auto stored = torch::cat({smooth, torch::full({1, 24, 40}, k, torch::kUInt8)});
      const auto rgb = io::decode_image(encode_cmyk_jpeg(stored, space), "cmyk.jpg");
      ASSERT_EQ(rgb.sizes(), (std::vector<int64_t>{3, 24, 40}));
      const auto want = smooth.to(torch::kFloat32) * static_cast<float>(k) / 255;
      EXPECT_LT((rgb.to(torch::kFloat32) - want).abs().mean().item<float>(), 2.5f);
    }
  // Pillow assumes Adobe's inverted inks for every CMYK JPEG, with the marker or without.
  const auto stored = torch::cat({smooth, torch::full({1, 24, 40}, 255, torch::kUInt8)});
  const auto plain = io::decode_image(encode_cmyk_jpeg(stored, JCS_CMYK, false), "cmyk.jpg");
  EXPECT_LT((plain.to(torch::kFloat32) - smooth.to(torch::kFloat32)).abs().mean().item<float>(),
            2.5f);
}

TEST(TarShards, ReadsWebDatasetSamples) {
  const auto dir = test::temp_dir();
  const auto rgb = test_image(3, 20, 30);
  {
    data::TarShardWriter tar(dir + "/a.tar");
    tar.add("x/000.jpg", io::encode_jpeg(rgb));
    tar.add("x/000.txt", "  a red dress \n");
    tar.add("x/._001.png", "AppleDouble");  // macOS tar's metadata members: in no sample
    tar.add("x/001.png", io::encode_png(rgb));
    tar.add("x/._001.json", "AppleDouble");
    tar.add("x/001.json", R"({"caption": "a sneaker", "width": 30})");
    tar.add("x/002.WEBP", io::encode_webp_lossless(rgb));
    tar.add("x/002.txt",
            "\xEF\xBB\xBF"
            "an ankle boot");  // a byte-order mark: dropped
    tar.add("x/002.meta.json", "{}");
    tar.add("README", "not part of any sample");
    tar.close();
  }
  EXPECT_FALSE(fs::exists(dir + "/a.tar.tmp" + std::to_string(::getpid())));
  data::TarShardReader reader(dir + "/a.tar");
  data::RawSample raw;
  std::vector<data::Sample> got;
  while (reader.next(raw, true))
    got.push_back(data::decode_sample(raw, "a.tar"));
  EXPECT_TRUE(reader.error().empty());
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[0].key, "x/000");
  EXPECT_EQ(got[0].caption, "a red dress");
  EXPECT_EQ(got[1].caption, "a sneaker");
  EXPECT_TRUE(torch::equal(got[1].image, rgb));
  EXPECT_EQ(got[2].caption, "an ankle boot");
  EXPECT_TRUE(torch::equal(got[2].image, rgb));
  // Reading without the bytes gives the same keys and fields.
  data::TarShardReader skim(dir + "/a.tar");
  std::vector<std::string> keys;
  while (skim.next(raw, false)) {
    keys.push_back(raw.key);
    for (auto& [ext, bytes] : raw.fields)
      EXPECT_TRUE(bytes.empty()) << ext;
  }
  EXPECT_THAT(keys, ElementsAre("x/000", "x/001", "x/002"));
  EXPECT_THROW(data::TarShardReader(dir + "/missing.tar"), Error);
}

TEST(TarShards, BadRecordsAreSkippedCountedAndNamed) {
  const auto dir = test::temp_dir();
  const auto good = io::encode_png(test_image(3, 16, 16));
  {
    data::TarShardWriter tar(dir + "/bad.tar");
    tar.add("0.png", good);
    tar.add("0.txt", "fine");
    tar.add("1.png", good.substr(0, good.size() / 2));  // corrupt image
    tar.add("1.txt", "cut");
    tar.add("2.png", good);
    tar.add("2.txt", std::string("caf\xe9", 4));  // Latin-1, not UTF-8
    tar.add("3.png", good);                       // no caption
    tar.add("4.txt", "no image");
    tar.add("5.png", good);
    tar.add("5.json", "{not json");
    tar.add("6.png", good);
    tar.add("6.txt", "also fine");
    tar.close();
  }
  data::DataSource source;
  source.shards = dir + "/bad.tar";
  source.shuffle_buffer = 1;
  data::SampleStream stream(source);
  EXPECT_EQ(stream.next().caption, "fine");
  EXPECT_EQ(stream.next().caption, "also fine");
  EXPECT_EQ(stream.stats().skipped, 5);
  EXPECT_EQ(stream.stats().samples, 2);
  EXPECT_EQ(stream.next().caption, "fine");  // the next epoch
  // Each reason names the shard and the key.
  data::TarShardReader reader(dir + "/bad.tar");
  data::RawSample raw;
  std::vector<std::string> errors;
  while (reader.next(raw, true)) {
    try {
      data::decode_sample(raw, "bad.tar");
    } catch (const Error& e) {
      errors.push_back(e.what());
    }
  }
  ASSERT_EQ(errors.size(), 5u);
  EXPECT_THAT(errors[0], HasSubstr("bad.tar:1: corrupt PNG"));
  EXPECT_THAT(errors[1], HasSubstr("bad.tar:2: the caption is not UTF-8 (bad byte at offset 3)"));
  EXPECT_THAT(errors[2], HasSubstr("bad.tar:3: no caption"));
  EXPECT_THAT(errors[3], HasSubstr("bad.tar:4: no image"));
  EXPECT_THAT(errors[4], HasSubstr("bad.tar:5: the json member is not a JSON object"));
}

TEST(TarShards, TruncatedShardYieldsWhatPrecedesTheDamage) {
  const auto dir = test::temp_dir();
  write_shard(dir + "/full.tar", 0, 6, 32, 32);
  const auto bytes = read_all(dir + "/full.tar");
  write_all(dir + "/cut.tar", bytes.substr(0, bytes.size() * 6 / 10));
  std::vector<int> counts;
  for (bool load : {true, false}) {
    data::TarShardReader reader(dir + "/cut.tar");
    data::RawSample raw;
    int n = 0;
    while (reader.next(raw, load)) {
      EXPECT_EQ(raw.fields.size(), 2u);
      if (load) {
        EXPECT_NO_THROW(data::decode_sample(raw, "cut.tar"));
      }
      ++n;
    }
    EXPECT_GE(n, 2);
    EXPECT_LT(n, 6);
    EXPECT_FALSE(reader.error().empty());
    counts.push_back(n);
  }
  EXPECT_EQ(counts[0], counts[1]);  // skimming (a resume's replay) sees the same samples
  // In a stream: the damage is counted and the job goes on with the other shard.
  write_shard(dir + "/other.tar", 100, 3);
  data::DataSource source;
  source.shards = dir + "/{cut,other}.tar";
  data::SampleStream stream(source);
  std::set<std::string> captions;
  for (int i = 0; i < 6; ++i)
    captions.insert(stream.next().caption);
  EXPECT_EQ(stream.stats().damaged_shards, 1);
  EXPECT_TRUE(captions.count("caption 100"));
  // Shards that do not exist are named.
  source.shards = dir + "/{other,nope}.tar";
  try {
    data::SampleStream s(source);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("nope.tar: shard not found"));
  }
}

TEST(ImageFolder, CaptionFilesAndShards) {
  const auto top = test::temp_dir(), dir = top + "/imgs";
  fs::create_directories(dir + "/sub");
  fs::create_directories(top + "/pool");
  write_all(dir + "/b.png", io::encode_png(test_image(3, 8, 8)));
  write_all(dir + "/b.txt", "bee");
  write_all(dir + "/sub/a.JPG", io::encode_jpeg(test_image(3, 8, 8)));
  write_all(dir + "/sub/a.caption", "ay");
  write_all(dir + "/c.webp", io::encode_webp_lossless(test_image(3, 8, 8)));
  write_all(dir + "/c.json", R"({"text": "sea"})");
  write_all(dir + "/d.PNG", io::encode_png(test_image(3, 8, 8)));
  write_all(dir + "/d.TXT", "dee");  // upper-case names, as some cameras and tools write them
  write_all(dir + "/e.png", "not an image");
  write_all(dir + "/e.txt", "broken");
  // A link to an image elsewhere is an image of the link's name, captioned beside the link.
  write_all(top + "/pool/p.png", io::encode_png(test_image(3, 8, 8, 5)));
  fs::create_symlink("../pool/p.png", dir + "/link.png");
  write_all(dir + "/link.txt", "linked");
  write_all(dir + "/lonely.png", io::encode_png(test_image(3, 8, 8)));
  int64_t uncaptioned = 0;
  const auto shards = data::list_image_folder(dir, 2, &uncaptioned);
  EXPECT_EQ(uncaptioned, 1);
  ASSERT_EQ(shards.size(), 3u);
  EXPECT_THAT(shards[0].images, ElementsAre("b.png", "c.webp"));
  EXPECT_THAT(shards[1].images, ElementsAre("d.PNG", "e.png"));
  EXPECT_THAT(shards[2].images, ElementsAre("link.png", "sub/a.JPG"));
  data::DataSource source;
  source.image_folder = dir;
  source.folder_shard_size = 2;
  source.shuffle_buffer = 1;
  source.seed = 3;
  data::SampleStream stream(source);
  std::set<std::string> captions;
  data::Sample sample;
  while (stream.next_of_epoch(&sample)) {  // one pass
    captions.insert(sample.caption);
    if (sample.caption == "linked") {
      EXPECT_EQ(sample.key, "link.png");
      EXPECT_TRUE(torch::equal(sample.image, test_image(3, 8, 8, 5)));
    }
  }
  EXPECT_EQ(captions, (std::set<std::string>{"bee", "ay", "sea", "dee", "linked"}));
  EXPECT_EQ(stream.stats().skipped, 1);
  // A bad file is named by its path in the folder.
  data::FolderShardReader reader(shards[1]);
  data::RawSample raw;
  ASSERT_TRUE(reader.next(raw, true));
  ASSERT_TRUE(reader.next(raw, true));
  try {
    data::decode_sample(raw, dir);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("imgs:e.png: not a PNG, JPEG or WebP image"));
  }
  EXPECT_THROW(data::list_image_folder(dir + "/b.png", 2), Error);
}

TEST(SampleStream, RanksShareEachEpochAndTheBufferShuffles) {
  const auto dir = test::temp_dir();
  const auto source = write_shards(dir, "s", 4, 10, /*buffer=*/8, /*seed=*/5);
  auto epoch_of = [&](int rank, int world) {
    data::SampleStream stream(source, rank, world);
    std::vector<std::string> out;
    for (int i = 0; i < 40 / world; ++i)
      out.push_back(stream.next().caption);
    return out;
  };
  const auto r0 = epoch_of(0, 2), r1 = epoch_of(1, 2), single = epoch_of(0, 1);
  std::set<std::string> both(r0.begin(), r0.end());
  both.insert(r1.begin(), r1.end());
  EXPECT_EQ(both.size(), 40u);  // disjoint, and together the whole epoch
  EXPECT_EQ(std::set<std::string>(single.begin(), single.end()).size(), 40u);
  EXPECT_EQ(epoch_of(0, 2), r0);  // deterministic
  // The buffer mixes shards: the first ten samples come from more than one shard.
  std::set<int> first_shards;
  for (int i = 0; i < 10; ++i)
    first_shards.insert(std::stoi(single[static_cast<size_t>(i)].substr(8)) / 10);
  EXPECT_GT(first_shards.size(), 1u);
  EXPECT_THROW(data::SampleStream(source, 0, 5), Error);  // 4 shards, 5 ranks
}

TEST(Buckets, SdxlListAndFitting) {
  const auto b = data::make_buckets(1024, 64, 4.0);
  auto has = [&](int64_t h, int64_t w) {
    return std::find(b.begin(), b.end(), data::Bucket{h, w}) != b.end();
  };
  for (auto [h, w] : std::vector<std::pair<int64_t, int64_t>>{
           {1024, 1024}, {896, 1152}, {832, 1216}, {768, 1344}, {640, 1536}, {512, 2048}}) {
    EXPECT_TRUE(has(h, w)) << h << "x" << w;
    EXPECT_TRUE(has(w, h)) << w << "x" << h;
  }
  for (const auto& k : b) {
    EXPECT_LE(k.height * k.width, 1024 * 1024);
    EXPECT_EQ(k.height % 64, 0);
    EXPECT_LE(std::max(k.height, k.width), 4 * std::min(k.height, k.width));
  }
  EXPECT_EQ(data::make_buckets(32, 8, 1.0).size(), 1u);
  // The automatic step: SDXL's 64 at 1024, resolution / 16 elsewhere, dividing the resolution.
  EXPECT_EQ(data::bucket_step(0, 1024, 8), 64);
  EXPECT_EQ(data::bucket_step(0, 512, 8), 32);
  EXPECT_EQ(data::bucket_step(0, 960, 8), 48);
  EXPECT_EQ(data::bucket_step(0, 64, 8), 8);
  EXPECT_EQ(data::bucket_step(0, 32, 4), 4);
  EXPECT_EQ(data::bucket_step(128, 1024, 8), 128);
  for (int64_t bad : {60, 96, -8})
    try {
      data::bucket_step(bad, 1024, 8);
      ADD_FAILURE() << bad;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("bucket_step"));
    }
  EXPECT_EQ(b[data::nearest_bucket(b, 600, 1000)], (data::Bucket{768, 1280}));  // 0.6 exactly
  EXPECT_EQ(b[data::nearest_bucket(b, 500, 500)], (data::Bucket{1024, 1024}));

  // A 60x100 image into a 32x64 bucket: resized to 38x64 (covering it), cropped at the centre.
  const auto image = test_image(3, 60, 100);
  const auto f = data::fit_to_bucket(image, {32, 64}, 3, false, 0);
  EXPECT_EQ(f.pixels.sizes(), (std::vector<int64_t>{3, 32, 64}));
  EXPECT_EQ(f.time_ids, (std::array<int64_t, 6>{60, 100, 3, 0, 32, 64}));
  EXPECT_LE(f.pixels.max().item<float>(), 1.0f);
  EXPECT_GE(f.pixels.min().item<float>(), -1.0f);
  // The same size: no resampling, an exact crop of the pixels.
  const auto same = data::fit_to_bucket(image, {60, 100}, 1, true, 7);
  EXPECT_TRUE(
      torch::allclose(same.pixels, io::to_channels(image, 1).to(torch::kFloat32) / 127.5 - 1));
  // An image more than 4x off its bucket's aspect ratio is refused by name, before any resize
  // (a 4000x1 strip covering 1024x1024 would take 25 GB).
  try {
    data::fit_to_bucket(torch::zeros({3, 1, 4000}, torch::kUInt8), {1024, 1024}, 3, false, 0,
                        "s.tar:strip");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("s.tar:strip: a 4000x1 (w x h) image is 4000.0 times"));
  }
  EXPECT_NO_THROW(data::fit_to_bucket(test_image(3, 16, 64), {16, 16}, 3, false, 0));  // 4x
  // Random crops differ by seed and stay inside the resized image.
  const auto a = data::fit_to_bucket(test_image(3, 100, 100), {32, 64}, 3, true, 1);
  EXPECT_EQ(a.time_ids[0], 100);
  EXPECT_EQ(a.time_ids[3] + 64, 64);  // resized to 64x64: the crop can only move vertically
  EXPECT_LE(a.time_ids[2], 64 - 32);
}

TEST(BucketBatcher, BatchesOneBucketAndResumesExactly) {
  const auto dir = test::temp_dir();
  // Images of three aspect ratios (h = 16, 24, 32 for w = 16) in 3 shards of 7.
  const auto source = write_shards(dir, "b", 3, 7, /*buffer=*/5, /*seed=*/11);
  data::BatcherOptions options;
  options.batch_size = 3;
  options.channels = 1;
  options.buckets = data::make_buckets(32, 8, 2.0);  // 40x24, 32x32, 24x40
  options.seed = 4;
  auto same = [](const data::Batch& a, const data::Batch& b) {
    return a.captions == b.captions && torch::equal(a.pixels, b.pixels) &&
           torch::equal(a.time_ids, b.time_ids);
  };
  data::SampleStream stream(source);
  data::BucketBatcher batcher(stream, options);
  std::set<int64_t> heights;
  for (int i = 0; i < 4; ++i) {
    const auto batch = batcher.next();
    EXPECT_EQ(batch.pixels.size(0), 3);
    EXPECT_EQ(batch.pixels.size(2), batch.bucket.height);
    EXPECT_EQ(batch.time_ids[0][4].item<int64_t>(), batch.bucket.height);
    heights.insert(batch.bucket.height);
  }
  EXPECT_GT(heights.size(), 1u);  // more than one bucket used
  const auto state = batcher.state();
  std::vector<data::Batch> after;
  for (int i = 0; i < 12; ++i)  // into the next epochs (21 samples per epoch)
    after.push_back(batcher.next());
  EXPECT_GT(stream.position().epoch, 0);

  data::SampleStream stream2(source);
  data::BucketBatcher resumed(stream2, options);
  resumed.restore(nlohmann::json::parse(state.dump()));
  for (size_t i = 0; i < after.size(); ++i)
    EXPECT_TRUE(same(resumed.next(), after[i])) << "batch " << i << " after the resume";
  EXPECT_EQ(stream2.stats().samples, stream.stats().samples);

  // A state made with other buckets is refused.
  auto other = options;
  other.buckets = data::make_buckets(32, 8, 1.0);
  data::SampleStream stream3(source);
  data::BucketBatcher wrong(stream3, other);
  EXPECT_THROW(wrong.restore(state), Error);

  // The same shards moved elsewhere resume; another shard list is refused, naming both.
  fs::create_directories(dir + "/moved");
  for (int s = 0; s < 3; ++s)
    fs::copy_file(fmt::format("{}/b-{}.tar", dir, s), fmt::format("{}/moved/b-{}.tar", dir, s));
  auto moved = source;
  moved.shards = dir + "/moved/b-{0..2}.tar";
  data::SampleStream stream4(moved);
  data::BucketBatcher relocated(stream4, options);
  relocated.restore(state);
  EXPECT_TRUE(same(relocated.next(), after[0]));
  auto fewer = source;
  fewer.shards = dir + "/b-{0..1}.tar";
  data::SampleStream stream5(fewer);
  data::BucketBatcher changed(stream5, options);
  try {
    changed.restore(state);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("made from other data (3 shards"));
  }
}

TEST(BucketBatcher, ImagesFarFromEveryBucketAreSkippedNotFitted) {
  const auto dir = test::temp_dir();
  {
    data::TarShardWriter tar(dir + "/mixed.tar");
    for (int i = 0; i < 4; ++i) {
      const auto key = fmt::format("{}", i);
      // Every other image a 200x2 strip: 120 times wider than the widest bucket (40x24).
      tar.add(key + ".png", io::encode_png(i % 2 ? test_image(3, 2, 200) : test_image(3, 16, 16)));
      tar.add(key + ".txt", fmt::format("caption {}", i));
    }
    tar.close();
    data::TarShardWriter strips(dir + "/strips.tar");
    strips.add("0.png", io::encode_png(test_image(3, 2, 200)));
    strips.add("0.txt", "a strip");
    strips.close();
  }
  data::BatcherOptions options;
  options.batch_size = 2;
  options.channels = 3;
  options.buckets = data::make_buckets(32, 8, 2.0);
  data::DataSource source;
  source.shards = dir + "/mixed.tar";
  source.shuffle_buffer = 1;
  data::SampleStream stream(source);
  data::BucketBatcher batcher(stream, options);
  const auto batch = batcher.next();
  EXPECT_EQ(batch.captions, (std::vector<std::string>{"caption 0", "caption 2"}));
  EXPECT_EQ(stream.stats().skipped, 1);  // caption 1; caption 3 is not read yet
  // Data of such images alone ends with a line, not a loop without end.
  source.shards = dir + "/strips.tar";
  data::SampleStream only_strips(source);
  data::BucketBatcher none(only_strips, options);
  try {
    none.next();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("no usable sample"));
  }
}

TEST(BatchPrefetcher, TheBatcherBatchesAndStateAndItsErrorsInTurn) {
  const auto dir = test::temp_dir();
  const auto source = write_shards(dir, "p", 3, 7, /*buffer=*/5, /*seed=*/0);
  data::BatcherOptions options;
  options.batch_size = 2;
  options.channels = 3;
  options.buckets = data::make_buckets(32, 8, 2.0);
  for (int64_t depth : {0, 1, 3}) {
    SCOPED_TRACE("depth " + std::to_string(depth));
    data::SampleStream stream(source);
    data::BucketBatcher batcher(stream, options);
    data::SampleStream reference_stream(source);
    data::BucketBatcher reference(reference_stream, options);
    data::BatchPrefetcher prefetcher(batcher, depth);
    EXPECT_EQ(prefetcher.state(), reference.state());
    for (int i = 0; i < 25; ++i) {  // over two epochs
      const auto a = prefetcher.next(), b = reference.next();
      ASSERT_EQ(a.keys, b.keys) << "batch " << i;
      EXPECT_TRUE(torch::equal(a.pixels, b.pixels) && torch::equal(a.time_ids, b.time_ids));
      // The state after the batch handed out, not after the ones read ahead.
      ASSERT_EQ(prefetcher.state(), reference.state()) << "batch " << i;
    }
  }  // destroyed with batches read ahead: the thread stops

  // A shard of undecodable images: the stream's error comes out of next(), not the thread.
  {
    data::TarShardWriter tar(dir + "/bad.tar");
    for (int i = 0; i < 3; ++i) {
      tar.add(fmt::format("b{}.png", i), "not a png");
      tar.add(fmt::format("b{}.txt", i), "a caption");
    }
    tar.close();
  }
  data::DataSource bad = source;
  bad.shards = dir + "/bad.tar";
  data::SampleStream bad_stream(bad);
  data::BucketBatcher bad_batcher(bad_stream, options);
  data::BatchPrefetcher bad_prefetcher(bad_batcher, 2);
  try {
    bad_prefetcher.next();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("gave rank 0 no usable sample")) << e.what();
  }
}

}  // namespace
}  // namespace lightning
