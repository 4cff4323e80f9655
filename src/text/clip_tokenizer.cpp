#include "text/clip_tokenizer.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/uniset.h>
#include <unicode/unistr.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_config.h"

namespace lightning::text {
namespace {

const char* const kStartOfText = "<|startoftext|>";
const char* const kEndOfText = "<|endoftext|>";
const char* const kWordEnd = "</w>";

// simple_tokenizer.py's pattern, case-insensitive; [\p{N}] takes one digit per token.
const char* const kPattern =
    R"(<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|)"
    R"([^\s\p{L}\p{N}]+)";

std::string utf8(const icu::UnicodeString& s) {
  std::string out;
  s.toUTF8String(out);
  return out;
}

std::u32string code_points(const icu::UnicodeString& s) {
  std::u32string out;
  for (int32_t i = 0; i < s.length(); i = s.moveIndex32(i, 1))
    out.push_back(s.char32At(i));
  return out;
}

icu::UnicodeString from_code_points(const std::u32string& cps) {
  icu::UnicodeString s;
  for (char32_t c : cps)
    s.append(static_cast<UChar32>(c));
  return s;
}

void append_utf8(std::string& out, char32_t c) {
  icu::UnicodeString s(static_cast<UChar32>(c));
  s.toUTF8String(out);
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the others to 256 + n.
// The order of the returned list is CLIP's vocabulary order (printables first).
std::vector<std::pair<uint8_t, std::string>> bytes_to_unicode() {
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b)
    bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b)
    bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b)
    bs.push_back(b);
  std::vector<int> cs = bs;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
      bs.push_back(b);
      cs.push_back(256 + n++);
    }
  }
  std::vector<std::pair<uint8_t, std::string>> out;
  for (size_t i = 0; i < bs.size(); ++i) {
    std::string s;
    append_utf8(s, static_cast<char32_t>(cs[i]));
    out.emplace_back(static_cast<uint8_t>(bs[i]), s);
  }
  return out;
}

const std::vector<std::string>& byte_encoder() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    for (auto& [b, s] : bytes_to_unicode())
      t[b] = s;
    return t;
  }();
  return table;
}

// Python's str.isspace: Unicode White_Space plus the separators U+001C..U+001F.
bool is_python_space(char32_t c) {
  return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_WHITE_SPACE) ||
         (c >= 0x1C && c <= 0x1F);
}

// The subset of ftfy.fix_text described in the header, in ftfy's order.
icu::UnicodeString ftfy_subset(const icu::UnicodeString& text) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfkc = icu::Normalizer2::getNFKCInstance(status);
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) fail("ICU: cannot load the Unicode normalisation data");
  auto nfkc_of = [&](char32_t c) {
    UErrorCode st = U_ZERO_ERROR;
    return code_points(nfkc->normalize(icu::UnicodeString(static_cast<UChar32>(c)), st));
  };
  std::u32string out;
  for (char32_t c : code_points(text)) {
    std::u32string piece(1, c);
    // fix_latin_ligatures: IJ, ŉ, DŽ/LJ/NJ/DZ families, ﬀ..ﬆ (ﬅ keeps its long s).
    if (c == 0xFB05)
      piece = U"\u017Ft";
    else if (c == 0x0132 || c == 0x0133 || c == 0x0149 || (c >= 0x01C4 && c <= 0x01CC) ||
             (c >= 0x01F1 && c <= 0x01F3) || (c >= 0xFB00 && c <= 0xFB06))
      piece = nfkc_of(c);
    // fix_character_width: full-width and half-width forms to their NFKC form.
    else if (c == 0x3000)
      piece = U" ";
    else if (c >= 0xFF01 && c < 0xFFF0)
      piece = nfkc_of(c);
    for (char32_t p : piece) {
      // uncurl_quotes
      if (p == 0x02BC || (p >= 0x2018 && p <= 0x201B)) p = U'\'';
      if (p >= 0x201C && p <= 0x201F) p = U'"';
      // remove_control_chars
      const bool control = p <= 0x08 || p == 0x0B || (p >= 0x0E && p <= 0x1F) || p == 0x7F ||
                           (p >= 0x206A && p <= 0x206F) || p == 0xFEFF ||
                           (p >= 0xFFF9 && p <= 0xFFFC);
      if (!control) out.push_back(p);
    }
  }
  return nfc->normalize(from_code_points(out), status);
}

// Python's html.unescape for numeric references, and a few named entities (see the header).
std::string html_unescape(const std::string& s) {
  if (s.find('&') == std::string::npos) return s;
  struct Named {
    const char* name;
    const char* text;
    bool legacy;  // also recognised without ';'
  };
  static const Named kNamed[] = {
      {"amp", "&", true},       {"AMP", "&", true},       {"lt", "<", true},
      {"LT", "<", true},        {"gt", ">", true},        {"GT", ">", true},
      {"quot", "\"", true},     {"QUOT", "\"", true},     {"apos", "'", false},
      {"nbsp", "\u00A0", true}, {"copy", "\u00A9", true}, {"COPY", "\u00A9", true},
      {"reg", "\u00AE", true},  {"REG", "\u00AE", true},
  };
  // html._invalid_charrefs: Windows-1252 for 0x80..0x9F, U+FFFD for 0, CR for 0x0D.
  static const char16_t kCp1252[32] = {
      0x20AC, 0x81,   0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
      0x2039, 0x0152, 0x8D,   0x017D, 0x8F,   0x90,   0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
      0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D,   0x017E, 0x0178};
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '&') {
      out.push_back(s[i++]);
      continue;
    }
    size_t j = i + 1;
    if (j < s.size() && s[j] == '#') {
      // &#[0-9]+;? or &#[xX][0-9a-fA-F]+;?
      const bool hex = j + 1 < s.size() && (s[j + 1] == 'x' || s[j + 1] == 'X');
      size_t k = j + (hex ? 2 : 1);
      const size_t digits_begin = k;
      uint64_t num = 0;
      while (k < s.size() && (hex ? std::isxdigit(static_cast<unsigned char>(s[k]))
                                  : std::isdigit(static_cast<unsigned char>(s[k])))) {
        const char c = static_cast<char>(std::tolower(static_cast<unsigned char>(s[k])));
        num = std::min<uint64_t>(num * (hex ? 16 : 10) + (c <= '9' ? c - '0' : c - 'a' + 10),
                                 0x7FFFFFFF);
        ++k;
      }
      if (k == digits_begin) {
        out.push_back(s[i++]);
        continue;
      }
      if (k < s.size() && s[k] == ';') ++k;
      if (num >= 0x80 && num <= 0x9F)
        append_utf8(out, kCp1252[num - 0x80]);
      else if (num == 0)
        append_utf8(out, 0xFFFD);
      else if (num == 0x0D)
        out.push_back('\r');
      else if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF)
        append_utf8(out, 0xFFFD);
      else if (!((num >= 0x1 && num <= 0x8) || (num >= 0xE && num <= 0x1F) || num == 0xB ||
                 num == 0x7F || (num >= 0xFDD0 && num <= 0xFDEF) || (num & 0xFFFE) == 0xFFFE))
        append_utf8(out, static_cast<char32_t>(num));
      i = k;
      continue;
    }
    // &[^\t\n\f <&#;]{1,32};?
    size_t k = j;
    while (k < s.size() && k - j < 32 && !std::strchr("\t\n\f <&#;", s[k]))
      ++k;
    const std::string name = s.substr(j, k - j);
    const bool semicolon = k < s.size() && s[k] == ';';
    bool done = false;
    if (!name.empty()) {
      for (const auto& e : kNamed) {
        if (name == e.name && (semicolon || e.legacy)) {
          out += e.text;
          i = k + (semicolon ? 1 : 0);
          done = true;
          break;
        }
      }
      // The longest legacy entity that prefixes the name: "&ampx" -> "&x".
      for (size_t len = name.size() - 1; !done && len > 1; --len) {
        for (const auto& e : kNamed) {
          if (e.legacy && name.compare(0, len, e.name) == 0 && std::strlen(e.name) == len) {
            out += e.text;
            i = j + len;
            done = true;
            break;
          }
        }
      }
    }
    if (!done) out.push_back(s[i++]);
  }
  return out;
}

std::string read_gz(const std::string& file) {
  gzFile gz = gzopen(file.c_str(), "rb");
  if (!gz) fail("{}: cannot open", file);
  std::string out;
  char buffer[1 << 16];
  int n;
  while ((n = gzread(gz, buffer, sizeof(buffer))) > 0)
    out.append(buffer, n);
  const bool bad = n < 0;
  gzclose(gz);
  if (bad) fail("{}: not a readable gzip file", file);
  return out;
}

std::string read_text(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("{}: cannot open", file);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    lines.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return lines;
}

// Merge lines after the "#version" header, at most kMaxMerges of them, each "first second".
std::vector<std::pair<std::string, std::string>> parse_merges(const std::string& text,
                                                              const std::string& file) {
  auto lines = split_lines(text);
  while (!lines.empty() && lines.back().find_first_not_of(" \t\r") == std::string::npos)
    lines.pop_back();
  std::vector<std::pair<std::string, std::string>> merges;
  for (size_t i = 1; i < lines.size() && merges.size() < CLIPTokenizer::kMaxMerges; ++i) {
    std::istringstream ss(lines[i]);
    std::string first, second, extra;
    if (!(ss >> first >> second) || (ss >> extra))
      fail("{}: line {} is not a merge 'first second': '{}'", file, i + 1, lines[i]);
    merges.emplace_back(first, second);
  }
  if (merges.empty()) fail("{}: no merges", file);
  return merges;
}

}  // namespace

struct CLIPTokenizer::Cache {
  std::mutex mutex;
  std::unordered_map<std::string, std::vector<int64_t>> ids;  // byte-encoded pre-token -> ids
};

CLIPTokenizer::CLIPTokenizer(CLIPTokenizer&&) noexcept = default;
CLIPTokenizer& CLIPTokenizer::operator=(CLIPTokenizer&&) noexcept = default;
CLIPTokenizer::~CLIPTokenizer() = default;

CLIPTokenizer::CLIPTokenizer(std::unordered_map<std::string, int64_t> encoder,
                             std::vector<std::pair<std::string, std::string>> merges,
                             const std::string& source)
    : encoder_(std::move(encoder)), merges_(std::move(merges)), cache_(std::make_unique<Cache>()) {
  for (size_t i = 0; i < merges_.size(); ++i)
    ranks_.emplace(merges_[i].first + " " + merges_[i].second, i);
  bos_id_ = token_to_id(kStartOfText);
  eos_id_ = token_to_id(kEndOfText);
  if (bos_id_ < 0) fail("{}: the vocabulary has no '{}'", source, kStartOfText);
  if (eos_id_ < 0) fail("{}: the vocabulary has no '{}'", source, kEndOfText);
  unk_id_ = eos_id_;
}

CLIPTokenizer CLIPTokenizer::load(const std::string& path) {
  namespace fs = std::filesystem;
  if (fs::is_directory(path)) return from_directory(path);
  if (!fs::exists(path)) fail("{}: no such file or directory", path);
  return from_bpe_gz(path);
}

CLIPTokenizer CLIPTokenizer::from_bpe_gz(const std::string& file) {
  // simple_tokenizer.py: lines[1 : 49152 - 256 - 2 + 1] of the merges file.
  auto merges = parse_merges(read_gz(file), file);
  std::vector<std::string> vocab;
  for (auto& [b, s] : bytes_to_unicode())
    vocab.push_back(s);
  for (size_t i = 0; i < 256; ++i)
    vocab.push_back(vocab[i] + kWordEnd);
  for (auto& [first, second] : merges)
    vocab.push_back(first + second);
  vocab.push_back(kStartOfText);
  vocab.push_back(kEndOfText);
  std::unordered_map<std::string, int64_t> encoder;
  for (size_t i = 0; i < vocab.size(); ++i)
    encoder[vocab[i]] = static_cast<int64_t>(i);
  return CLIPTokenizer(std::move(encoder), std::move(merges), file);
}

CLIPTokenizer CLIPTokenizer::from_directory(const std::string& dir) {
  const std::string vocab_file = dir + "/vocab.json";
  const std::string merges_file = dir + "/merges.txt";
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(read_text(vocab_file));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: invalid JSON ({})", vocab_file, e.what());
  }
  if (!json.is_object()) fail("{}: expected an object token -> id", vocab_file);
  std::unordered_map<std::string, int64_t> encoder;
  for (auto& [token, id] : json.items()) {
    if (!id.is_number_integer()) fail("{}: id of '{}' is not an integer", vocab_file, token);
    encoder[token] = id.get<int64_t>();
  }
  auto merges = parse_merges(read_text(merges_file), merges_file);
  return CLIPTokenizer(std::move(encoder), std::move(merges), vocab_file);
}

int64_t CLIPTokenizer::token_to_id(const std::string& token) const {
  auto it = encoder_.find(token);
  return it == encoder_.end() ? -1 : it->second;
}

std::string CLIPTokenizer::clean_text(const std::string& text) {
  // basic_clean: ftfy.fix_text, html.unescape twice (strip is subsumed below).
  std::string s = utf8(ftfy_subset(icu::UnicodeString::fromUTF8(text)));
  s = html_unescape(html_unescape(s));
  // whitespace_clean: re.sub(r"\s+", " ", text).strip()
  std::u32string collapsed;
  for (char32_t c : code_points(icu::UnicodeString::fromUTF8(s))) {
    if (is_python_space(c)) {
      if (!collapsed.empty() && collapsed.back() != U' ') collapsed.push_back(U' ');
    } else {
      collapsed.push_back(c);
    }
  }
  if (!collapsed.empty() && collapsed.back() == U' ') collapsed.pop_back();
  // .lower(): full Unicode case mapping, including Final_Sigma, as Python's str.lower.
  return utf8(from_code_points(collapsed).toLower(icu::Locale::getRoot()));
}

std::vector<std::string> CLIPTokenizer::pre_tokenize(const std::string& cleaned) {
  static const icu::RegexPattern* pattern = [] {
    UErrorCode status = U_ZERO_ERROR;
    UParseError parse_error;
    auto* p = icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(kPattern),
                                         UREGEX_CASE_INSENSITIVE, parse_error, status);
    if (U_FAILURE(status)) fail("ICU: cannot compile CLIP's pattern ({})", u_errorName(status));
    return p;
  }();
  // Python's regex module, ignoring case, matches neither [\p{L}] nor [^\s\p{L}\p{N}] for a
  // non-letter that is case-equivalent to a letter (e.g. U+0345, which folds to iota), so such
  // characters are skipped; ICU's negated set would match them. They become spaces here.
  static const icu::UnicodeSet* skipped = [] {
    UErrorCode status = U_ZERO_ERROR;
    icu::UnicodeSet kept(UNICODE_STRING_SIMPLE("[\\s\\p{L}\\p{N}]"), status);
    auto* set = new icu::UnicodeSet(kept);
    set->closeOver(USET_CASE_INSENSITIVE).removeAll(kept).freeze();
    if (U_FAILURE(status)) fail("ICU: cannot build a character set ({})", u_errorName(status));
    return set;
  }();
  icu::UnicodeString input;
  for (char32_t c : code_points(icu::UnicodeString::fromUTF8(cleaned)))
    input.append(skipped->contains(static_cast<UChar32>(c)) ? UChar32{' '} : UChar32(c));
  UErrorCode status = U_ZERO_ERROR;
  std::unique_ptr<icu::RegexMatcher> matcher(pattern->matcher(input, status));
  if (U_FAILURE(status)) fail("ICU: regex matcher failed ({})", u_errorName(status));
  std::vector<std::string> pieces;
  while (matcher->find(status) && U_SUCCESS(status))
    pieces.push_back(utf8(matcher->group(status)));
  if (U_FAILURE(status)) fail("ICU: regex search failed ({})", u_errorName(status));
  return pieces;
}

std::vector<std::string> CLIPTokenizer::bpe(const std::string& token) const {
  // Symbols are the byte-encoded characters (UTF-8 sequences); the last gets "</w>".
  std::vector<std::string> word;
  for (int32_t i = 0; i < static_cast<int32_t>(token.size());) {
    int32_t start = i;
    UChar32 c;
    U8_NEXT(token.data(), i, static_cast<int32_t>(token.size()), c);
    (void)c;
    word.push_back(token.substr(start, i - start));
  }
  if (word.empty()) return word;
  word.back() += kWordEnd;
  while (word.size() > 1) {
    // The adjacent pair with the lowest merge rank.
    size_t best_rank = std::numeric_limits<size_t>::max();
    size_t best = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = ranks_.find(word[i] + " " + word[i + 1]);
      if (it != ranks_.end() && it->second < best_rank) {
        best_rank = it->second;
        best = i;
      }
    }
    if (best_rank == std::numeric_limits<size_t>::max()) break;
    const std::string first = word[best], second = word[best + 1];
    std::vector<std::string> merged;
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
        merged.push_back(first + second);
        i += 2;
      } else {
        merged.push_back(word[i++]);
      }
    }
    word = std::move(merged);
  }
  return word;
}

std::vector<int64_t> CLIPTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids{bos_id_};
  const auto& encoder = byte_encoder();
  for (const auto& piece : pre_tokenize(clean_text(text))) {
    // CLIP's bpe cache starts with the two special tokens mapped to themselves.
    if (piece == kStartOfText || piece == kEndOfText) {
      ids.push_back(piece == kStartOfText ? bos_id_ : eos_id_);
      continue;
    }
    std::string token;
    for (unsigned char b : piece)
      token += encoder[b];
    {
      std::lock_guard<std::mutex> lock(cache_->mutex);
      auto it = cache_->ids.find(token);
      if (it != cache_->ids.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        continue;
      }
    }
    std::vector<int64_t> piece_ids;
    for (const auto& symbol : bpe(token)) {
      const int64_t id = token_to_id(symbol);
      piece_ids.push_back(id < 0 ? unk_id_ : id);
    }
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
    std::lock_guard<std::mutex> lock(cache_->mutex);
    cache_->ids.emplace(std::move(token), std::move(piece_ids));
  }
  ids.push_back(eos_id_);
  return ids;
}

CLIPEncoding CLIPTokenizer::encode_padded(const std::string& text, int64_t pad_id,
                                          int64_t max_length) const {
  if (max_length < 2)
    fail_usage("max length {} is too short for the start and end tokens", max_length);
  auto ids = encode(text);
  if (static_cast<int64_t>(ids.size()) > max_length) {
    ids.resize(max_length - 1);
    ids.push_back(eos_id_);
  }
  CLIPEncoding enc;
  enc.eos_position = static_cast<int64_t>(ids.size()) - 1;
  enc.attention_mask.assign(max_length, 0);
  std::fill(enc.attention_mask.begin(), enc.attention_mask.begin() + ids.size(), 1);
  enc.input_ids = std::move(ids);
  enc.input_ids.resize(max_length, pad_id);
  return enc;
}

}  // namespace lightning::text

namespace lightning::text {

CLIPTokenizer CLIPTokenizer::restricted_to(const std::vector<std::string>& texts) const {
  // The merge that creates each merged symbol (its lowest rank: CLIP's merged symbols are unique).
  std::unordered_map<std::string, size_t> producer;
  for (size_t i = 0; i < merges_.size(); ++i)
    producer.emplace(merges_[i].first + merges_[i].second, i);
  std::vector<bool> keep(merges_.size(), false);
  std::vector<std::string> pending;
  const auto& encoder = byte_encoder();
  for (const auto& text : texts)
    for (const auto& piece : pre_tokenize(clean_text(text))) {
      if (piece == kStartOfText || piece == kEndOfText) continue;
      std::string token;
      for (unsigned char b : piece)
        token += encoder[b];
      for (auto& symbol : bpe(token))
        pending.push_back(symbol);
    }
  // Every merge on the way to a kept symbol is kept too, so BPE takes the same path.
  while (!pending.empty()) {
    std::string symbol = std::move(pending.back());
    pending.pop_back();
    auto it = producer.find(symbol);
    if (it == producer.end() || keep[it->second]) continue;
    keep[it->second] = true;
    pending.push_back(merges_[it->second].first);
    pending.push_back(merges_[it->second].second);
  }
  std::unordered_map<std::string, int64_t> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
  int64_t next = 0;
  for (const auto& [byte, symbol] : bytes_to_unicode())
    vocab.emplace(symbol, next++);
  for (const auto& [byte, symbol] : bytes_to_unicode())
    vocab.emplace(symbol + kWordEnd, next++);
  for (size_t i = 0; i < merges_.size(); ++i)
    if (keep[i]) {
      merges.push_back(merges_[i]);
      vocab.emplace(merges_[i].first + merges_[i].second, next++);
    }
  vocab.emplace(kStartOfText, next++);
  vocab.emplace(kEndOfText, next++);
  return CLIPTokenizer(std::move(vocab), std::move(merges), "restricted vocabulary");
}

void CLIPTokenizer::save(const std::string& dir, int64_t pad_id) const {
  std::string pad_token = kEndOfText;
  for (const auto& [token, id] : encoder_)
    if (id == pad_id) pad_token = token;
  std::filesystem::create_directories(dir);
  nlohmann::json vocab = nlohmann::json::object();
  for (const auto& [token, id] : encoder_)
    vocab[token] = id;
  io::write_file_atomic(dir + "/vocab.json", vocab.dump());
  std::string merges = "#version: 0.2\n";
  for (const auto& [first, second] : merges_)
    merges += first + " " + second + "\n";
  io::write_file_atomic(dir + "/merges.txt", merges);
  nlohmann::json special = {{"bos_token", kStartOfText},
                            {"eos_token", kEndOfText},
                            {"unk_token", kEndOfText},
                            {"pad_token", pad_token}};
  io::write_json_file(dir + "/special_tokens_map.json", special);
  nlohmann::json config = special;
  config["tokenizer_class"] = "CLIPTokenizer";
  config["model_max_length"] = kContextLength;
  config["do_lower_case"] = true;
  config["clean_up_tokenization_spaces"] = true;
  config["errors"] = "replace";
  io::write_json_file(dir + "/tokenizer_config.json", config);
}

}  // namespace lightning::text
