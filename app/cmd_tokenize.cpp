// `lightning tokenize [--vocab FILE] TEXT...`: one JSON array of CLIP token ids per text, one
// line each, start and end tokens included, no padding (DESIGN.md contract).
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "app/commands.h"
#include "core/error.h"
#include "text/clip_tokenizer.h"

namespace lightning::app {
namespace {

struct TokenizeArgs {
  std::string vocab;
  std::vector<std::string> texts;
  int64_t max_length = 0;  // 0: no truncation or padding
  int64_t pad = -1;        // -1: the end-of-text id
};

void run_tokenize(const TokenizeArgs& args) {
  const auto tokenizer =
      text::CLIPTokenizer::load(args.vocab.empty() ? shipped_vocab() : args.vocab);
  if (args.pad >= 0 && args.max_length == 0) fail_usage("tokenize: --pad needs --max-length");
  for (const auto& text : args.texts) {
    std::vector<int64_t> ids;
    if (args.max_length > 0)
      ids = tokenizer
                .encode_padded(text, args.pad >= 0 ? args.pad : tokenizer.eos_id(), args.max_length)
                .input_ids;
    else
      ids = tokenizer.encode(text);
    std::printf("%s\n", nlohmann::json(ids).dump().c_str());
  }
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto args = std::make_shared<TokenizeArgs>();
  auto* cmd = app.add_subcommand(
      "tokenize",
      "Print the CLIP token ids of each text as a JSON array, one line per text (start and end "
      "tokens included, no padding).\n"
      "Example: lightning tokenize \"a photo of a cat\"   ->   "
      "[49406,320,1125,539,320,2368,49407]");
  cmd->add_option("texts", args->texts, "Texts to tokenize (put -- before a text starting with -)")
      ->required();
  cmd->add_option("--vocab", args->vocab,
                  "CLIP BPE merges file (bpe_simple_vocab_16e6.txt.gz) or a tokenizer directory "
                  "with vocab.json + merges.txt (default: the shipped data/clip vocabulary)");
  cmd->add_option("--max-length", args->max_length,
                  "Truncate (keeping the end token) and pad to N ids; CLIP models use 77")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  cmd->add_option("--pad", args->pad,
                  "Pad id with --max-length (default: end-of-text 49407; SDXL's second "
                  "tokenizer uses 0 = \"!\")")
      ->check(CLI::NonNegativeNumber);
  cmd->callback([args] { run_tokenize(*args); });
}

}  // namespace lightning::app
