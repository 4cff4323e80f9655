// The CLIP tokenizer against CLIP's own outputs (../shared/data/clip/tokenizer_cases.json, made
// with OpenAI CLIP / transformers), the tokenizer-directory layout, truncation and padding, and
// `lightning tokenize`.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "test_util.h"
#include "text/clip_tokenizer.h"

namespace lightning {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using text::CLIPTokenizer;
namespace fs = std::filesystem;

constexpr int64_t kBos = 49406;
constexpr int64_t kEos = 49407;

std::string shipped_vocab() {
  return test::source_path("data/clip/bpe_simple_vocab_16e6.txt.gz");
}

const CLIPTokenizer& clip() {
  static const CLIPTokenizer tokenizer = CLIPTokenizer::from_bpe_gz(shipped_vocab());
  return tokenizer;
}

struct Case {
  std::string text;
  std::vector<int64_t> ids;
};

// The public cases live in shared/ beside the repository; absent in a bare clone.
std::vector<Case> shared_cases() {
  const auto file = test::source_path("../shared/data/clip/tokenizer_cases.json");
  std::vector<Case> cases;
  if (!fs::exists(file)) return cases;
  std::ifstream in(file);
  for (const auto& c : nlohmann::json::parse(in))
    cases.push_back({c.at("text").get<std::string>(), c.at("ids").get<std::vector<int64_t>>()});
  return cases;
}

// Texts that exercise every branch of clean-up and pre-tokenisation.
const std::vector<std::string> kEdgeTexts = {"",
                                             "2024",
                                             "it's",
                                             "!!!",
                                             "café",
                                             "猫の写真",
                                             "a  photo\n\nof\ta cat",
                                             "A PHOTO OF A CAT",
                                             "&amp;amp; “quoted” ﬁne Ｈｅｌｌｏ",
                                             "<|endoftext|> in the middle",
                                             "x²½ ΣΑΣ"};

std::vector<int64_t> wrap(std::vector<int64_t> ids) {
  ids.insert(ids.begin(), kBos);
  ids.push_back(kEos);
  return ids;
}

TEST(Tokenizer, SharedCases) {
  const auto cases = shared_cases();
  if (cases.empty()) GTEST_SKIP() << "../shared/data/clip/tokenizer_cases.json not found";
  for (const auto& c : cases)
    EXPECT_EQ(clip().encode(c.text), c.ids) << "text: '" << c.text << "'";
}

TEST(Tokenizer, VocabularyLayout) {
  // simple_tokenizer.py: 256 bytes (printables first), 256 with </w>, 48894 merges, 2 specials.
  EXPECT_EQ(clip().vocab().size(), 49408u);
  EXPECT_EQ(clip().merges().size(), CLIPTokenizer::kMaxMerges);
  EXPECT_EQ(clip().bos_id(), kBos);
  EXPECT_EQ(clip().eos_id(), kEos);
  EXPECT_EQ(clip().token_to_id("!"), 0);
  EXPECT_EQ(clip().token_to_id("!</w>"), 256);
  EXPECT_EQ(clip().token_to_id("cat</w>"), 2368);
  EXPECT_EQ(clip().token_to_id("no such token"), -1);
}

TEST(Tokenizer, EdgeCases) {
  EXPECT_EQ(clip().encode(""), wrap({}));
  EXPECT_EQ(clip().encode("   \n\t "), wrap({}));
  // One digit per token: "0</w>" is 256 + 15.
  EXPECT_EQ(clip().encode("2024"), wrap({273, 271, 273, 275}));
  EXPECT_THAT(CLIPTokenizer::pre_tokenize("it's"), ElementsAre("it", "'s"));
  EXPECT_THAT(CLIPTokenizer::pre_tokenize("don't!!! ok"), ElementsAre("don", "'t", "!!!", "ok"));
  EXPECT_EQ(clip().encode("!!!").size(), 3u);  // one merged "!!!</w>"
  EXPECT_THAT(CLIPTokenizer::pre_tokenize("café 猫の写真"), ElementsAre("café", "猫の写真"));
  EXPECT_EQ(clip().encode("a  photo\n\nof\ta cat"), clip().encode("a photo of a cat"));
  EXPECT_EQ(clip().encode("A PHOTO OF A CAT"), clip().encode("a photo of a cat"));
  // As Python's regex module ignoring case: U+0345 (folds to a letter) matches nothing.
  EXPECT_THAT(CLIPTokenizer::pre_tokenize("\u0345x"), ElementsAre("x"));
  EXPECT_EQ(clip().encode("a <|endoftext|> b"),
            wrap({clip().token_to_id("a</w>"), kEos, clip().token_to_id("b</w>")}));
  // CJK goes through the byte-level BPE: every id is a real one.
  for (int64_t id : clip().encode("猫の写真"))
    EXPECT_TRUE(id >= 0 && id <= kEos);
}

TEST(Tokenizer, CleanText) {
  EXPECT_EQ(CLIPTokenizer::clean_text("  Hello   World \n"), "hello world");
  EXPECT_EQ(CLIPTokenizer::clean_text("&amp;amp; &lt;b&gt; &#65;&#x42; &quot;q&quot; &#39;"),
            "& <b> ab \"q\" '");
  EXPECT_EQ(CLIPTokenizer::clean_text("&ampx &unknown; &#150;"), "&x &unknown; \u2013");
  EXPECT_EQ(CLIPTokenizer::clean_text("“quoted” ‘single’"), "\"quoted\" 'single'");
  EXPECT_EQ(CLIPTokenizer::clean_text("ﬁne Ｈｅｌｌｏ\u3000x"), "fine hello x");
  EXPECT_EQ(CLIPTokenizer::clean_text("ΣΑΣ İ"), "σας i\u0307");  // Final_Sigma, full mapping
  EXPECT_EQ(CLIPTokenizer::clean_text("e\u0301"), "\u00e9");     // NFC
  EXPECT_EQ(CLIPTokenizer::clean_text("a\u00a0\u2003b\u2028c\u0085d"), "a b c d");
  // ftfy removes control characters (U+001C is one) before the whitespace clean-up.
  EXPECT_EQ(CLIPTokenizer::clean_text("b\u001cc\u200bd"), "bc\u200bd");
}

// A hand-made vocabulary: merge ranks decide the order ("a b</w>" before "a b").
TEST(Tokenizer, TinyDirectory) {
  const auto dir = test::temp_dir();
  std::ofstream(dir + "/vocab.json") << R"({"a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "ab": 4,
      "ab</w>": 5, "<|startoftext|>": 6, "<|endoftext|>": 7})";
  std::ofstream(dir + "/merges.txt") << "#version: 0.2\na b</w>\na b\n";
  const auto tokenizer = CLIPTokenizer::load(dir);
  EXPECT_EQ(tokenizer.bos_id(), 6);
  EXPECT_EQ(tokenizer.eos_id(), 7);
  EXPECT_THAT(tokenizer.encode("ABAB a"), ElementsAre(6, 4, 5, 2, 7));
  EXPECT_THAT(tokenizer.encode("ba"), ElementsAre(6, 1, 2, 7));
  // Unknown symbols map to transformers' unk_token, <|endoftext|>.
  EXPECT_THAT(tokenizer.encode("c"), ElementsAre(6, 7, 7));
}

TEST(Tokenizer, DirectoryErrorsNameTheFile) {
  const auto dir = test::temp_dir();
  std::ofstream(dir + "/vocab.json") << R"({"a": 0, "<|startoftext|>": 1})";
  std::ofstream(dir + "/merges.txt") << "#version: 0.2\na b\n";
  try {
    CLIPTokenizer::load(dir);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("vocab.json"));
    EXPECT_THAT(e.what(), HasSubstr("<|endoftext|>"));
  }
  std::ofstream(dir + "/vocab.json") << R"({"<|startoftext|>": 0, "<|endoftext|>": 1})";
  std::ofstream(dir + "/merges.txt") << "#version: 0.2\na b c\n";
  EXPECT_THROW(CLIPTokenizer::load(dir), Error);
  EXPECT_THROW(CLIPTokenizer::load(dir + "/missing"), Error);
}

// The full vocabulary written in transformers' layout gives the same ids as the .gz.
TEST(Tokenizer, FullDirectoryMatchesGz) {
  const auto dir = test::temp_dir();
  std::ofstream(dir + "/vocab.json") << nlohmann::json(clip().vocab()).dump();
  {
    std::ofstream merges(dir + "/merges.txt");
    merges << "#version: 0.2\n";
    for (const auto& [first, second] : clip().merges())
      merges << first << " " << second << "\n";
  }
  const auto tokenizer = CLIPTokenizer::load(dir);
  for (const auto& c : shared_cases())
    EXPECT_EQ(tokenizer.encode(c.text), c.ids) << c.text;
  for (const auto& t : kEdgeTexts)
    EXPECT_EQ(tokenizer.encode(t), clip().encode(t)) << t;
}

TEST(Tokenizer, TruncationKeepsEos) {
  std::string text;
  for (int i = 0; i < 100; ++i)
    text += "cat ";
  const auto full = clip().encode(text);
  ASSERT_EQ(full.size(), 102u);
  const auto enc = clip().encode_padded(text, kEos);
  ASSERT_EQ(enc.input_ids.size(), 77u);
  EXPECT_TRUE(std::equal(enc.input_ids.begin(), enc.input_ids.begin() + 76, full.begin()));
  EXPECT_EQ(enc.input_ids.back(), kEos);
  EXPECT_EQ(enc.eos_position, 76);
  EXPECT_EQ(std::count(enc.attention_mask.begin(), enc.attention_mask.end(), 1), 77);
  // Exactly 77 ids: no truncation.
  std::string exact;
  for (int i = 0; i < 75; ++i)
    exact += "cat ";
  EXPECT_EQ(clip().encode_padded(exact, 0).input_ids, clip().encode(exact));
}

TEST(Tokenizer, PaddingWithEosOrZero) {
  const std::vector<int64_t> cat = {kBos, 320, 1125, 539, 320, 2368, kEos};
  for (int64_t pad : {kEos, int64_t{0}}) {
    const auto enc = clip().encode_padded("a photo of a cat", pad);
    ASSERT_EQ(enc.input_ids.size(), 77u);
    EXPECT_TRUE(std::equal(cat.begin(), cat.end(), enc.input_ids.begin()));
    EXPECT_TRUE(std::all_of(enc.input_ids.begin() + 7, enc.input_ids.end(),
                            [pad](int64_t id) { return id == pad; }));
    EXPECT_EQ(enc.eos_position, 6);
    EXPECT_EQ(std::count(enc.attention_mask.begin(), enc.attention_mask.begin() + 7, 1), 7);
    EXPECT_EQ(std::count(enc.attention_mask.begin() + 7, enc.attention_mask.end(), 0), 70);
  }
  EXPECT_THROW(clip().encode_padded("x", 0, 1), UsageError);
}

TEST(TokenizerCli, PrintsOneArrayPerText) {
  auto r = test::run_lightning("tokenize \"a photo of a cat\" \"\" \"Ankle boot\"");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output,
            "[49406,320,1125,539,320,2368,49407]\n[49406,49407]\n[49406,14777,8087,49407]\n");
  r = test::run_lightning("tokenize --vocab " + shipped_vocab() + " \"2024\"");
  EXPECT_EQ(r.output, "[49406,273,271,273,275,49407]\n");
  r = test::run_lightning("tokenize --max-length 8 --pad 0 \"a photo of a cat\"");
  EXPECT_EQ(r.output, "[49406,320,1125,539,320,2368,49407,0]\n");
  r = test::run_lightning("tokenize --help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("Example: lightning tokenize"));
}

TEST(TokenizerCli, Errors) {
  const auto missing = test::temp_dir() + "/no-such-vocab.txt.gz";
  auto r = test::run_lightning("tokenize --vocab " + missing + " hello");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_THAT(r.output, HasSubstr(missing));
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  r = test::run_lightning("tokenize");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = test::run_lightning("tokenize --pad 0 hello");
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

}  // namespace
}  // namespace lightning
