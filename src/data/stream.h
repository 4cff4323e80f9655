// A stream of training samples from tar shards or an image folder, for any number of ranks:
// every epoch the shard list is shuffled alike on all ranks and rank r reads shards r, r + W,
// r + 2W, ... (so each sample is seen by one rank per epoch); samples pass through a shuffle
// buffer; records that cannot be used (a corrupt image, a caption that is not UTF-8, a missing
// member) are skipped, counted and logged, and a truncated shard yields what precedes the damage.
//
// The position (epoch, records taken) is all a checkpoint needs: restore() replays the epoch
// from its start reading only tar headers, then reloads the records left in the shuffle buffer,
// so a resumed stream yields exactly what the uninterrupted one would have.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/shards.h"

namespace lightning::data {

struct DataSource {
  std::string shards;                // WebDataset tar shards: brace patterns separated by "::"
  std::string image_folder;          // or a folder of images with caption files
  int64_t folder_shard_size = 1000;  // images per shard of an image folder
  int64_t shuffle_buffer = 1000;     // records; <= 1: file order
  uint64_t seed = 0;
};

struct StreamPosition {
  int64_t epoch = 0;
  int64_t taken = 0;  // records taken out of the shuffle buffer in this epoch (bad ones included)
  nlohmann::json to_json() const { return {{"epoch", epoch}, {"taken", taken}}; }
  static StreamPosition from_json(const nlohmann::json& json);
};

struct StreamStats {
  int64_t samples = 0;         // usable samples delivered
  int64_t skipped = 0;         // records skipped (corrupt image, bad caption, missing member)
  int64_t damaged_shards = 0;  // shard reads that ended at damage (truncation, bad header)
};

class SampleStream {
 public:
  // Lists the shards (checking that every tar shard exists) and starts at epoch 0. Throws Error
  // naming the missing file, or if there are fewer shards than ranks.
  SampleStream(const DataSource& source, int rank = 0, int world = 1);
  ~SampleStream();

  // The next usable sample, with its epoch and key; epochs follow one another without end.
  // Throws Error if a whole epoch gives this rank no usable sample.
  Sample next();
  // The next usable sample of the current epoch, or false at its end (the stream stays there;
  // next() then starts the following epoch). For one pass over the data.
  bool next_of_epoch(Sample* sample);

  StreamPosition position() const { return {epoch_, taken_}; }
  // Moves to `position` (of a stream with the same source, seed, rank and world).
  void restore(const StreamPosition& position);

  // Reads and decodes the given samples again (random access by scanning their shards), in the
  // order given. Throws Error if one cannot be found or decoded any more.
  std::vector<Sample> load(const std::vector<std::pair<int64_t, SampleKey>>& epoch_keys);

  // A check of each decoded sample (given with its "shard:key" name) that throws Error to skip
  // it as a bad record; it must depend on the sample alone, so that a resumed run skips alike.
  using Filter = std::function<void(const Sample&, const std::string& name)>;
  void set_filter(Filter filter) { filter_ = std::move(filter); }

  const StreamStats& stats() const { return stats_; }
  // A resumed stream carries on the counts of the run it continues.
  void set_stats(const StreamStats& stats) { stats_ = stats; }
  int64_t num_shards() const { return static_cast<int64_t>(names_.size()); }
  const std::string& shard_name(int64_t shard) const {
    return names_.at(static_cast<size_t>(shard));
  }
  // A fingerprint of the data's layout: the shards' file names in order (not their folders, so
  // that data moved elsewhere still matches), or an image folder's file list. A position is only
  // meaningful for data of the same fingerprint.
  const std::string& fingerprint() const { return fingerprint_; }
  // The shards this rank reads in `epoch`, in order.
  std::vector<int64_t> shards_of_epoch(int64_t epoch) const;

 private:
  struct Record {
    SampleKey key;
    RawSample raw;
  };
  std::unique_ptr<ShardReader> open(int64_t shard) const;
  // The records at `keys` with their bytes, in the order given (each shard scanned once).
  std::vector<RawSample> reread(const std::vector<SampleKey>& keys) const;
  std::string compute_fingerprint() const;
  void start_epoch(int64_t epoch);
  void skip(const std::string& what);
  bool pull(bool load);                  // one record from the shards into the buffer
  bool take(Record* record, bool load);  // one record out of the buffer; false at epoch end

  DataSource source_;
  int rank_, world_;
  std::vector<std::string> names_;          // shard names (tar paths, or the folder)
  std::vector<FolderShard> folder_shards_;  // image folder only
  int64_t epoch_ = 0, taken_ = 0;
  std::vector<int64_t> order_;  // this rank's shards in this epoch
  size_t next_shard_ = 0;
  std::unique_ptr<ShardReader> reader_;
  int64_t reader_shard_ = -1, reader_ordinal_ = 0;
  std::vector<Record> buffer_;
  std::mt19937_64 rng_;
  int64_t usable_in_epoch_ = 0;
  StreamStats stats_;
  Filter filter_;
  std::string fingerprint_;
};

}  // namespace lightning::data
