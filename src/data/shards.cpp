#include "data/shards.h"

#include <archive.h>
#include <archive_entry.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/files.h"
#include "io/image_codecs.h"
#include "io/safetensors_bytes.h"
#include "text/utf8.h"

namespace fs = std::filesystem;

namespace lightning::data {
namespace {

// The closing brace matching the one at `open`, or npos.
size_t matching_brace(const std::string& s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size(); ++i) {
    if (s[i] == '{') ++depth;
    if (s[i] == '}' && --depth == 0) return i;
  }
  return std::string::npos;
}

// Splits a brace body at its top-level commas.
std::vector<std::string> split_top_level(const std::string& body) {
  std::vector<std::string> parts(1);
  int depth = 0;
  for (char c : body) {
    if (c == '{') ++depth;
    if (c == '}') --depth;
    if (c == ',' && depth == 0) {
      parts.emplace_back();
      continue;
    }
    parts.back() += c;
  }
  return parts;
}

bool parse_int(const std::string& s, int64_t* value) {
  if (s.empty() || s.size() > 18) return false;
  size_t i = s[0] == '-' ? 1 : 0;
  if (i == s.size()) return false;
  for (size_t k = i; k < s.size(); ++k)
    if (!std::isdigit(static_cast<unsigned char>(s[k]))) return false;
  *value = std::stoll(s);
  return true;
}

// "{lo..hi}" or "{lo..hi..step}" as a list of strings, or false if `body` is not a range.
bool expand_range(const std::string& body, const std::string& pattern,
                  std::vector<std::string>* out) {
  const size_t dots = body.find("..");
  if (dots == std::string::npos) return false;
  std::string lo_s = body.substr(0, dots), rest = body.substr(dots + 2), hi_s = rest, step_s;
  if (const size_t d2 = rest.find(".."); d2 != std::string::npos) {
    hi_s = rest.substr(0, d2);
    step_s = rest.substr(d2 + 2);
  }
  int64_t lo, hi, step = 1;
  if (!parse_int(lo_s, &lo) || !parse_int(hi_s, &hi) ||
      (!step_s.empty() && !parse_int(step_s, &step)))
    fail("shard pattern '{}': '{{{}}}' is not a numeric range like {{000..099}}", pattern, body);
  step = std::abs(step);
  if (step == 0) fail("shard pattern '{}': a range step of 0", pattern);
  if ((std::abs(hi - lo) / step) > 10'000'000)
    fail("shard pattern '{}': the range {{{}}} is too long", pattern, body);
  auto padded = [](const std::string& s) { return s.size() > 1 && s[0] == '0'; };
  const size_t width = padded(lo_s) || padded(hi_s) ? std::max(lo_s.size(), hi_s.size()) : 0;
  for (int64_t v = lo; lo <= hi ? v <= hi : v >= hi; v += lo <= hi ? step : -step) {
    std::string digits = std::to_string(std::abs(v));
    const size_t sign = v < 0 ? 1 : 0;
    if (digits.size() + sign < width) digits.insert(0, width - digits.size() - sign, '0');
    out->push_back((v < 0 ? "-" : "") + digits);
  }
  return true;
}

std::string lower(std::string s) {
  for (auto& c : s)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// "dir/name.a.b" -> key "dir/name", extension "a.b" (lower-cased); a base name without a dot
// or starting with one (hidden files) gives an empty extension: not part of a sample.
void split_member_name(const std::string& name, std::string* key, std::string* ext) {
  const size_t slash = name.rfind('/');
  const size_t base = slash == std::string::npos ? 0 : slash + 1;
  const size_t dot = name.find('.', base);
  if (dot == std::string::npos || dot == base) {
    *key = name;
    ext->clear();
    return;
  }
  *key = name.substr(0, dot);
  *ext = lower(name.substr(dot + 1));
}

const std::vector<std::string>& image_extensions() {
  static const std::vector<std::string> e = {"jpg", "jpeg", "png", "webp"};
  return e;
}
const std::vector<std::string>& caption_extensions() {
  static const std::vector<std::string> e = {"txt", "caption", "json"};
  return e;
}

// The caption file of an image folder's image: the same name with extension .txt, .caption or
// .json (in that order of preference, any case: "a.JPG" + "a.TXT"), or empty if there is none.
fs::path caption_file(const fs::path& image) {
  std::error_code ec;
  for (const auto& c : caption_extensions()) {
    std::string upper = c;
    for (auto& ch : upper)
      ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    for (const auto& e : {c, upper}) {
      const fs::path p = fs::path(image).replace_extension("." + e);
      if (fs::is_regular_file(p, ec)) return p;
    }
  }
  return {};
}

std::string trim(const std::string& s) {
  const auto is_space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  size_t a = 0, b = s.size();
  while (a < b && is_space(s[a]))
    ++a;
  while (b > a && is_space(s[b - 1]))
    --b;
  return s.substr(a, b - a);
}

}  // namespace

std::vector<std::string> expand_braces(const std::string& pattern) {
  const size_t open = pattern.find('{');
  if (open == std::string::npos) {
    if (pattern.find('}') != std::string::npos)
      fail("shard pattern '{}': a '}}' without its '{{'", pattern);
    return {pattern};
  }
  const size_t close = matching_brace(pattern, open);
  if (close == std::string::npos) fail("shard pattern '{}': a '{{' without its '}}'", pattern);
  const std::string head = pattern.substr(0, open),
                    body = pattern.substr(open + 1, close - open - 1);
  if (head.find('}') != std::string::npos)
    fail("shard pattern '{}': a '}}' without its '{{'", pattern);
  std::vector<std::string> choices;
  if (body.find(',') == std::string::npos || split_top_level(body).size() == 1) {
    if (!expand_range(body, pattern, &choices)) choices = {"{" + body + "}"};  // literal braces
  } else {
    for (const auto& part : split_top_level(body))
      for (auto& e : expand_braces(part))
        choices.push_back(std::move(e));
  }
  const auto tails = expand_braces(pattern.substr(close + 1));
  std::vector<std::string> out;
  out.reserve(choices.size() * tails.size());
  for (const auto& c : choices)
    for (const auto& t : tails)
      out.push_back(head + c + t);
  return out;
}

std::vector<std::string> expand_shard_list(const std::string& spec) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    const size_t sep = spec.find("::", start);
    const std::string part = trim(spec.substr(start, sep == std::string::npos ? sep : sep - start));
    if (!part.empty())
      for (auto& p : expand_braces(part))
        out.push_back(std::move(p));
    if (sep == std::string::npos) break;
    start = sep + 2;
  }
  if (out.empty()) fail("shard list '{}' names no shard", spec);
  return out;
}

// ---- Tar shards.

TarShardReader::TarShardReader(const std::string& path) : path_(path) {
  archive_ = archive_read_new();
  archive_read_support_filter_all(archive_);
  archive_read_support_format_tar(archive_);
  archive_read_support_format_gnutar(archive_);
  if (archive_read_open_filename(archive_, path.c_str(), 1 << 16) != ARCHIVE_OK) {
    const std::string why = archive_error_string(archive_) ? archive_error_string(archive_) : "";
    archive_read_free(archive_);
    archive_ = nullptr;
    fail("{}: cannot open the shard: {}", path, why);
  }
}

TarShardReader::~TarShardReader() {
  if (archive_) archive_read_free(archive_);
}

bool TarShardReader::next(RawSample& sample, bool load) {
  sample.key.clear();
  sample.fields.clear();
  if (at_end_) return false;
  auto damaged = [&](const char* what) {
    const char* why = archive_error_string(archive_);
    error_ = fmt::format("{} ({})", what, why ? why : "no detail");
    at_end_ = true;
    sample.key.clear();  // the sample being assembled may be incomplete: dropped
    sample.fields.clear();
    return false;
  };
  while (true) {
    if (!has_pending_) {
      archive_entry* entry = nullptr;
      const int r = archive_read_next_header(archive_, &entry);
      if (r == ARCHIVE_EOF) {
        at_end_ = true;
        break;
      }
      if (r < ARCHIVE_WARN) return damaged("damaged tar header");
      if (archive_entry_filetype(entry) != AE_IFREG) continue;  // directories, links
      pending_name_ = archive_entry_pathname(entry) ? archive_entry_pathname(entry) : "";
      has_pending_ = true;
    }
    std::string key, ext;
    split_member_name(pending_name_, &key, &ext);
    // A member of no sample (no extension, or a hidden file such as macOS tar's "._0001.jpg")
    // is passed over without ending the sample around it, as WebDataset's grouping does.
    if (ext.empty()) {
      has_pending_ = false;
      if (archive_read_data_skip(archive_) < ARCHIVE_WARN) return damaged("truncated member");
      continue;
    }
    if (!sample.key.empty() && key != sample.key) break;  // the member starts the next sample
    has_pending_ = false;
    sample.key = key;
    std::string bytes;
    if (load) {
      char buffer[1 << 16];
      la_ssize_t got;
      while ((got = archive_read_data(archive_, buffer, sizeof buffer)) > 0)
        bytes.append(buffer, static_cast<size_t>(got));
      if (got < 0) return damaged("truncated member");
    } else if (archive_read_data_skip(archive_) < ARCHIVE_WARN) {
      return damaged("truncated member");
    }
    sample.fields.emplace(ext, std::move(bytes));  // a repeated extension keeps the first
  }
  return !sample.key.empty();
}

TarShardWriter::TarShardWriter(const std::string& path)
    : path_(path), tmp_(path + ".tmp" + std::to_string(::getpid())) {
  archive_ = archive_write_new();
  archive_write_set_format_pax_restricted(archive_);
  if (archive_write_open_filename(archive_, tmp_.c_str()) != ARCHIVE_OK) {
    const std::string why = archive_error_string(archive_) ? archive_error_string(archive_) : "";
    archive_write_free(archive_);
    archive_ = nullptr;
    fail("{}: cannot write: {}", path, why);
  }
}

TarShardWriter::~TarShardWriter() {
  if (archive_) {
    archive_write_free(archive_);
    std::error_code ec;
    fs::remove(tmp_, ec);
  }
}

void TarShardWriter::add(const std::string& name, const std::string& bytes) {
  if (!archive_) fail("{}: the shard is closed", path_);
  archive_entry* entry = archive_entry_new();
  archive_entry_set_pathname(entry, name.c_str());
  archive_entry_set_size(entry, static_cast<la_int64_t>(bytes.size()));
  archive_entry_set_filetype(entry, AE_IFREG);
  archive_entry_set_perm(entry, 0644);
  archive_entry_set_mtime(entry, std::time(nullptr), 0);
  const bool ok = archive_write_header(archive_, entry) == ARCHIVE_OK &&
                  archive_write_data(archive_, bytes.data(), bytes.size()) ==
                      static_cast<la_ssize_t>(bytes.size());
  archive_entry_free(entry);
  if (!ok)
    fail("{}: cannot write member {}: {}", path_, name,
         archive_error_string(archive_) ? archive_error_string(archive_) : "");
}

void TarShardWriter::close() {
  if (!archive_) return;
  const bool ok = archive_write_close(archive_) == ARCHIVE_OK;
  const std::string why = archive_error_string(archive_) ? archive_error_string(archive_) : "";
  archive_write_free(archive_);
  archive_ = nullptr;
  std::error_code ec;
  if (!ok) {
    fs::remove(tmp_, ec);
    fail("{}: cannot finish the shard: {}", path_, why);
  }
  fs::rename(tmp_, path_, ec);
  if (ec) {
    fs::remove(tmp_, ec);
    fail("{}: cannot rename into place: {}", path_, ec.message());
  }
}

// ---- Image folders.

std::vector<FolderShard> list_image_folder(const std::string& root, int64_t shard_size,
                                           int64_t* uncaptioned) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) fail("{}: not a directory (image folder)", root);
  if (shard_size < 1) fail("image folder shard size must be >= 1, got {}", shard_size);
  std::vector<std::string> images;
  int64_t missing = 0;
  std::string first_missing;
  for (auto it = fs::recursive_directory_iterator(
           root, fs::directory_options::skip_permission_denied, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    const fs::path& p = it->path();
    const std::string ext = lower(p.extension().string());
    if (ext.size() < 2 || std::find(image_extensions().begin(), image_extensions().end(),
                                    ext.substr(1)) == image_extensions().end())
      continue;
    const bool captioned = !caption_file(p).empty();
    // Relative to the root as listed: a symbolic link is an image of its own name, captioned
    // beside the link (fs::relative would resolve it to its target).
    const std::string rel = p.lexically_relative(root).generic_string();
    if (!captioned) {
      if (missing++ == 0) first_missing = rel;
      continue;
    }
    images.push_back(rel);
  }
  if (ec) fail("{}: cannot list: {}", root, ec.message());
  if (missing)
    spdlog::warn(
        "data: {} image(s) in {} have no caption file (.txt, .caption or .json) and are "
        "left out, e.g. {}",
        missing, root, first_missing);
  if (uncaptioned) *uncaptioned = missing;
  if (images.empty()) fail("{}: no captioned image (.jpg, .jpeg, .png or .webp)", root);
  std::sort(images.begin(), images.end());
  std::vector<FolderShard> shards;
  for (size_t i = 0; i < images.size(); i += static_cast<size_t>(shard_size)) {
    FolderShard s{root, {}};
    const size_t end = std::min(images.size(), i + static_cast<size_t>(shard_size));
    s.images.assign(images.begin() + static_cast<std::ptrdiff_t>(i),
                    images.begin() + static_cast<std::ptrdiff_t>(end));
    shards.push_back(std::move(s));
  }
  return shards;
}

bool FolderShardReader::next(RawSample& sample, bool load) {
  sample.key.clear();
  sample.fields.clear();
  if (next_ >= shard_.images.size()) return false;
  const fs::path rel = shard_.images[next_++];
  const fs::path image = fs::path(shard_.root) / rel;
  sample.key = rel.generic_string();  // with its extension: messages name the file
  std::string bytes;
  // An unreadable file gives an empty field: decode_sample names it; the key sequence is kept.
  if (load) io::read_file_bytes(image.string(), &bytes);
  sample.fields.emplace(lower(image.extension().string().substr(1)), std::move(bytes));
  const fs::path caption = caption_file(image);
  if (!caption.empty()) {
    std::string text;
    if (load) io::read_file_bytes(caption.string(), &text);
    const std::string c = lower(caption.extension().string().substr(1));
    sample.fields.emplace(c == "caption" ? "txt" : c, std::move(text));
  }
  return true;
}

// ---- Decoding.

Sample decode_sample(const RawSample& raw, const std::string& where) {
  Sample out;
  out.key = raw.key;
  const std::string name = fmt::format("{}:{}", where, raw.key);
  if (auto it = raw.fields.find("safetensors"); it != raw.fields.end()) {
    out.cached = io::decode_safetensors(it->second, name);
    for (const char* k : {"x", "context", "time_ids"})
      if (!out.cached.count(k)) fail("{}: the cached sample has no tensor '{}'", name, k);
    if (out.cached["time_ids"].numel() != 6)
      fail("{}: the cached sample's time_ids has {} values, not 6", name,
           out.cached["time_ids"].numel());
    if (auto txt = raw.fields.find("txt"); txt != raw.fields.end()) out.caption = trim(txt->second);
    return out;
  }
  const std::string* image = nullptr;
  for (const auto& ext : image_extensions())
    if (auto it = raw.fields.find(ext); it != raw.fields.end()) {
      image = &it->second;
      break;
    }
  if (!image) fail("{}: no image (jpg, jpeg, png or webp member)", name);
  std::string caption;
  if (auto it = raw.fields.find("txt"); it != raw.fields.end()) {
    caption = it->second;
  } else if (auto js = raw.fields.find("json"); js != raw.fields.end()) {
    const auto json = nlohmann::json::parse(js->second, nullptr, /*allow_exceptions=*/false);
    if (json.is_discarded() || !json.is_object())
      fail("{}: the json member is not a JSON object", name);
    bool found = false;
    for (const char* k : {"caption", "text", "prompt"})
      if (json.contains(k) && json[k].is_string()) {
        caption = json[k].get<std::string>();
        found = true;
        break;
      }
    if (!found) fail("{}: the json member has no \"caption\", \"text\" or \"prompt\" string", name);
  } else {
    fail("{}: no caption (txt or json member)", name);
  }
  size_t bad = 0;
  if (!text::is_valid_utf8(caption, &bad))
    fail("{}: the caption is not UTF-8 (bad byte at offset {})", name, bad);
  if (caption.rfind("\xEF\xBB\xBF", 0) == 0) caption.erase(0, 3);  // a byte-order mark
  out.caption = trim(caption);
  out.image = io::decode_image(*image, name);
  return out;
}

}  // namespace lightning::data
