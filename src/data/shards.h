// Training data at scale, the record layer: WebDataset tar shards read with libarchive (plain or
// compressed tars), shard lists written as brace patterns, and folders of images with caption
// files. A record ("sample") is the group of consecutive tar members that share a key, as in
// WebDataset: "000123.jpg" + "000123.txt" -> key "000123", fields {"jpg", "txt"}.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

struct archive;

namespace lightning::data {

// Expands shell-style braces as WebDataset's shard lists use them: "{a,b}" alternatives and
// "{000..099}" / "{0..98..2}" numeric ranges (zero-padded to the endpoints' width when either has
// a leading zero); several groups multiply, groups nest. Throws Error naming the pattern for an
// unbalanced brace or a bad range.
std::vector<std::string> expand_braces(const std::string& pattern);

// A shard list: patterns separated by "::" (as in WebDataset), each brace-expanded, in order.
std::vector<std::string> expand_shard_list(const std::string& spec);

struct RawSample {
  std::string key;                            // the member path up to its base name's first dot
  std::map<std::string, std::string> fields;  // lower-cased extension -> bytes ("" when skipped)
};

// Where a sample of a data source lies: shard index (in the full list) and its ordinal there.
struct SampleKey {
  int64_t shard = 0, ordinal = 0;
  bool operator<(const SampleKey& o) const {
    return shard != o.shard ? shard < o.shard : ordinal < o.ordinal;
  }
  bool operator==(const SampleKey& o) const { return shard == o.shard && ordinal == o.ordinal; }
};

// Reads the samples of one shard in order. A damaged shard (truncated, corrupt header) ends at
// the damage: the sample being assembled there is dropped, error() says what happened, and every
// sample before it is delivered. Reading with load = false skips the members' bytes (cheap) and
// yields the same keys, so a position can be replayed without decoding anything.
class ShardReader {
 public:
  virtual ~ShardReader() = default;
  // The next sample; false at the end of the shard (or at the damage).
  virtual bool next(RawSample& sample, bool load) = 0;
  const std::string& error() const { return error_; }

 protected:
  std::string error_;
};

// A WebDataset tar shard (tar, tar.gz, ... whatever libarchive reads).
class TarShardReader : public ShardReader {
 public:
  explicit TarShardReader(const std::string& path);  // throws Error if it cannot be opened
  ~TarShardReader() override;
  bool next(RawSample& sample, bool load) override;

 private:
  std::string path_;
  struct archive* archive_ = nullptr;
  bool has_pending_ = false, at_end_ = false;
  std::string pending_name_;  // a member whose header is read and whose data is not yet
};

// Writes a WebDataset tar shard (POSIX ustar/pax): add the members of each sample in order,
// then close(); the file appears at `path` only when close() succeeds (temporary + rename).
class TarShardWriter {
 public:
  explicit TarShardWriter(const std::string& path);
  ~TarShardWriter();  // without close(): the temporary file is removed
  void add(const std::string& name, const std::string& bytes);
  void close();

 private:
  std::string path_, tmp_;
  struct archive* archive_ = nullptr;
};

// An image folder: image files (.jpg .jpeg .png .webp, any depth) with a caption in a file of the
// same name and extension .txt, .caption or .json. A folder is cut into "shards" of consecutive
// files (sorted by path) so that ranks can share it as they share tar shards.
struct FolderShard {
  std::string root;
  std::vector<std::string> images;  // paths relative to root
};
// Lists `root` into shards of `shard_size` images. Images without a caption file are left out,
// counted in `*uncaptioned` and named in a warning. Throws Error if `root` is not a directory or
// holds no captioned image.
std::vector<FolderShard> list_image_folder(const std::string& root, int64_t shard_size,
                                           int64_t* uncaptioned = nullptr);

class FolderShardReader : public ShardReader {
 public:
  explicit FolderShardReader(const FolderShard& shard) : shard_(shard) {}
  bool next(RawSample& sample, bool load) override;

 private:
  const FolderShard& shard_;
  size_t next_ = 0;
};

// A decoded sample: the image and its caption.
struct Sample {
  SampleKey where;
  int64_t epoch = 0;
  std::string key;      // the record's key (tar) or the image's path in its folder
  torch::Tensor image;  // uint8 [C, H, W], C = 1 or 3; undefined for a cached sample
  std::string caption;  // UTF-8, surrounding white space removed
  // A cached sample (a "safetensors" member, written by `lightning cache`): "x" (the image in the
  // model's space, fitted to its bucket), "context" (the caption's text encoding), "time_ids" and,
  // for SDXL, "pooled" (the pooled text embeddings).
  std::map<std::string, torch::Tensor> cached;
};

// Decodes a record: its image (jpg, jpeg, png or webp field, by content) and its caption (the
// txt field, else the "caption", "text" or "prompt" string of the json field); or a cached
// sample (a safetensors field with x, context and time_ids; the caption is optional). Throws Error
// naming `where` and the key for a missing image or caption, a corrupt image, or a caption that is
// not UTF-8.
Sample decode_sample(const RawSample& raw, const std::string& where);

}  // namespace lightning::data
