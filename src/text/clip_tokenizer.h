// CLIP's byte-level BPE tokenizer, mirroring OpenAI CLIP's clip/simple_tokenizer.py
// (SimpleTokenizer) and transformers' CLIPTokenizer, for both SDXL text encoders.
//
// Text clean-up, as CLIP's basic_clean + whitespace_clean + lower():
//  - ftfy.fix_text is approximated by the parts that matter for prompts: NFC normalisation,
//    curly quotes to straight ones, Latin ligatures (U+FB00..FB06) and full-width ASCII
//    (U+FF01..FF5E, U+3000) to their plain forms, and removal of the control characters ftfy
//    removes. ftfy's mojibake repair (fix_encoding) is not implemented.
//  - html.unescape (applied twice) handles numeric references (&#NNN; &#xHH;, with Python's
//    replacements for invalid ones) and the named entities amp, lt, gt, quot, apos, nbsp, copy,
//    reg (all but apos also without ';', as Python accepts); other named entities stay as text.
//  - Runs of whitespace (Python's str.isspace) become one space; the ends are stripped;
//    the text is lower-cased with Unicode's full case mapping (ICU).
// Pre-tokenisation uses CLIP's pattern (ICU regex, case-insensitive):
//   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
// (one digit per token), then each piece's UTF-8 bytes go through GPT-2's byte-to-unicode map
// and BPE with "</w>" on the last symbol.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lightning::text {

// Token ids for one prompt, ready for a CLIP text encoder.
struct CLIPEncoding {
  std::vector<int64_t> input_ids;       // [max_length]: bos, tokens, eos, pad...
  std::vector<int64_t> attention_mask;  // [max_length]: 1 up to and including eos, then 0
  int64_t eos_position = 0;             // index of the end-of-text token in input_ids
};

class CLIPTokenizer {
 public:
  static constexpr int64_t kContextLength = 77;  // CLIP's n_ctx, both SDXL encoders
  // Merges CLIP uses: 49152 vocab entries - 256 bytes - 2 specials, as in simple_tokenizer.py.
  static constexpr size_t kMaxMerges = 49152 - 256 - 2;

  // From a path: the CLIP merges file (*.gz, e.g. bpe_simple_vocab_16e6.txt.gz) or a
  // tokenizer directory holding vocab.json + merges.txt (transformers' layout).
  static CLIPTokenizer load(const std::string& path);
  static CLIPTokenizer from_bpe_gz(const std::string& file);
  static CLIPTokenizer from_directory(const std::string& dir);

  // bos, the BPE ids of the text, eos; no truncation, no padding (`lightning tokenize`).
  std::vector<int64_t> encode(const std::string& text) const;

  // encode(), truncated to max_length keeping eos last, padded with pad_id to max_length.
  // SDXL's first tokenizer pads with eos (49407), its second with "!" (id 0).
  CLIPEncoding encode_padded(const std::string& text, int64_t pad_id,
                             int64_t max_length = kContextLength) const;

  // The cleaned, lower-cased text and its pre-tokens (before BPE), for tests and debugging.
  static std::string clean_text(const std::string& text);
  static std::vector<std::string> pre_tokenize(const std::string& cleaned);

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  // A tokenizer with CLIP's structure (the 512 byte symbols, merges in rank order, the two
  // special tokens) restricted to the merges that `texts` use: it tokenizes those texts into
  // the same symbols as this one (ids renumbered), and any other text into smaller pieces.
  // A small model trained on a fixed caption set needs a few hundred embeddings instead of
  // 49,408.
  CLIPTokenizer restricted_to(const std::vector<std::string>& texts) const;
  // Writes transformers' tokenizer directory: vocab.json, merges.txt, tokenizer_config.json
  // and special_tokens_map.json (model_max_length 77). The pad token is the entry of `pad_id`
  // (SDXL's second tokenizer: "!"), end-of-text when -1. Files are written atomically.
  void save(const std::string& dir, int64_t pad_id = -1) const;
  // Id of a vocabulary entry (e.g. "!" or "cat</w>"); -1 when absent.
  int64_t token_to_id(const std::string& token) const;
  const std::unordered_map<std::string, int64_t>& vocab() const { return encoder_; }
  // Merges in rank order, e.g. {"i", "n"}.
  const std::vector<std::pair<std::string, std::string>>& merges() const { return merges_; }

  CLIPTokenizer(CLIPTokenizer&&) noexcept;
  CLIPTokenizer& operator=(CLIPTokenizer&&) noexcept;
  ~CLIPTokenizer();

 private:
  CLIPTokenizer(std::unordered_map<std::string, int64_t> encoder,
                std::vector<std::pair<std::string, std::string>> merges, const std::string& source);
  // BPE of one byte-encoded pre-token: its vocabulary entries, the last one ending in "</w>".
  std::vector<std::string> bpe(const std::string& token) const;

  struct Cache;
  std::unordered_map<std::string, int64_t> encoder_;
  std::vector<std::pair<std::string, std::string>> merges_;
  std::unordered_map<std::string, size_t> ranks_;  // "first second" -> rank
  int64_t bos_id_ = -1;
  int64_t eos_id_ = -1;
  int64_t unk_id_ = -1;  // transformers' unk_token is <|endoftext|>
  std::unique_ptr<Cache> cache_;
};

}  // namespace lightning::text
