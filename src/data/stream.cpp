#include "data/stream.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include <spdlog/spdlog.h>

#include "core/error.h"
#include "train/train_util.h"

namespace fs = std::filesystem;

namespace lightning::data {
namespace {

// The seed purposes of the stream (train::mix_seed's second argument).
constexpr uint64_t kShardOrderSeed = 41, kBufferSeed = 42;

// Logged in full up to this many skipped records, then once per kSkipLogEvery.
constexpr int64_t kSkipLogFull = 20, kSkipLogEvery = 1000;

}  // namespace

StreamPosition StreamPosition::from_json(const nlohmann::json& json) {
  StreamPosition p;
  p.epoch = json.at("epoch").get<int64_t>();
  p.taken = json.at("taken").get<int64_t>();
  if (p.epoch < 0 || p.taken < 0) fail("data position {} is negative", json.dump());
  return p;
}

SampleStream::SampleStream(const DataSource& source, int rank, int world)
    : source_(source), rank_(rank), world_(world) {
  if (source.shards.empty() == source.image_folder.empty())
    fail("data: give either shards or an image folder");
  if (!source.shards.empty()) {
    names_ = expand_shard_list(source.shards);
    for (const auto& n : names_) {
      std::error_code ec;
      if (!fs::is_regular_file(n, ec))
        fail("{}: shard not found (from the shard list '{}')", n, source.shards);
    }
  } else {
    folder_shards_ = list_image_folder(source.image_folder, source.folder_shard_size);
    // Every shard is named by the folder: its records' keys are the files' paths in it.
    names_.assign(folder_shards_.size(), source.image_folder);
  }
  fingerprint_ = compute_fingerprint();
  if (num_shards() < world)
    fail("data: {} shard(s) cannot be shared by {} ranks: every rank needs at least one",
         num_shards(), world);
  if (num_shards() % world != 0 && rank == 0)
    spdlog::warn("data: {} shards do not divide among {} ranks: the ranks' epochs differ in length",
                 num_shards(), world);
  start_epoch(0);
}

SampleStream::~SampleStream() = default;

std::string SampleStream::compute_fingerprint() const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a, 64 bits
  auto add = [&](const std::string& s) {
    for (unsigned char c : s + '\n')
      h = (h ^ c) * 1099511628211ull;
  };
  if (folder_shards_.empty()) {
    for (const auto& name : names_)
      add(fs::path(name).filename().string());
  } else {
    for (const auto& shard : folder_shards_) {
      for (const auto& image : shard.images)
        add(image);
      add("");  // the shard boundaries matter too
    }
  }
  return fmt::format("{} shards, {:016x}", names_.size(), h);
}

std::vector<int64_t> SampleStream::shards_of_epoch(int64_t epoch) const {
  std::vector<int64_t> all(names_.size());
  for (size_t i = 0; i < all.size(); ++i)
    all[i] = static_cast<int64_t>(i);
  std::mt19937_64 rng(train::mix_seed(source_.seed, kShardOrderSeed, static_cast<uint64_t>(epoch)));
  for (size_t i = all.size(); i > 1; --i)  // Fisher-Yates, the same on every rank
    std::swap(all[i - 1], all[rng() % i]);
  std::vector<int64_t> mine;
  for (size_t i = static_cast<size_t>(rank_); i < all.size(); i += static_cast<size_t>(world_))
    mine.push_back(all[i]);
  return mine;
}

std::unique_ptr<ShardReader> SampleStream::open(int64_t shard) const {
  if (!folder_shards_.empty())
    return std::make_unique<FolderShardReader>(folder_shards_.at(static_cast<size_t>(shard)));
  return std::make_unique<TarShardReader>(names_.at(static_cast<size_t>(shard)));
}

void SampleStream::start_epoch(int64_t epoch) {
  epoch_ = epoch;
  taken_ = 0;
  order_ = shards_of_epoch(epoch);
  next_shard_ = 0;
  reader_.reset();
  reader_shard_ = -1;
  buffer_.clear();
  rng_.seed(
      train::mix_seed(source_.seed, kBufferSeed,
                      static_cast<uint64_t>(epoch) * 1'000'003 + static_cast<uint64_t>(rank_)));
  usable_in_epoch_ = 0;
}

void SampleStream::skip(const std::string& what) {
  ++stats_.skipped;
  if (stats_.skipped <= kSkipLogFull)
    spdlog::warn("data: skipped {}", what);
  else if (stats_.skipped % kSkipLogEvery == 0)
    spdlog::warn("data: {} records skipped so far (latest: {})", stats_.skipped, what);
}

bool SampleStream::pull(bool load) {
  while (true) {
    if (!reader_) {
      if (next_shard_ >= order_.size()) return false;
      reader_shard_ = order_[next_shard_++];
      reader_ordinal_ = 0;
      try {
        reader_ = open(reader_shard_);
      } catch (const Error& e) {  // e.g. deleted since it was listed: counted like damage
        ++stats_.damaged_shards;
        spdlog::warn("data: {}", e.what());
        continue;
      }
    }
    Record r;
    if (reader_->next(r.raw, load)) {
      r.key = {reader_shard_, reader_ordinal_++};
      buffer_.push_back(std::move(r));
      return true;
    }
    if (!reader_->error().empty()) {
      ++stats_.damaged_shards;
      spdlog::warn("data: {}: {} after {} samples; the rest of the shard is skipped",
                   shard_name(reader_shard_), reader_->error(), reader_ordinal_);
    }
    reader_.reset();
  }
}

bool SampleStream::take(Record* record, bool load) {
  const size_t capacity = static_cast<size_t>(std::max<int64_t>(1, source_.shuffle_buffer));
  while (buffer_.size() < capacity && pull(load)) {
  }
  if (buffer_.empty()) return false;
  const size_t j = capacity > 1 ? static_cast<size_t>(rng_() % buffer_.size()) : 0;
  std::swap(buffer_[j], buffer_.back());
  *record = std::move(buffer_.back());
  buffer_.pop_back();
  ++taken_;
  return true;
}

bool SampleStream::next_of_epoch(Sample* sample) {
  Record r;
  while (take(&r, /*load=*/true)) {
    try {
      *sample = decode_sample(r.raw, shard_name(r.key.shard));
      if (filter_) filter_(*sample, shard_name(r.key.shard) + ":" + r.raw.key);
      sample->where = r.key;
      sample->epoch = epoch_;
      ++usable_in_epoch_;
      ++stats_.samples;
      return true;
    } catch (const Error& e) {
      skip(e.what());
    }
  }
  return false;
}

Sample SampleStream::next() {
  Sample s;
  while (!next_of_epoch(&s)) {
    if (usable_in_epoch_ == 0)
      fail("data: epoch {} gave rank {} no usable sample from its {} shard(s) ({} skipped in all)",
           epoch_, rank_, order_.size(), stats_.skipped);
    start_epoch(epoch_ + 1);
  }
  return s;
}

void SampleStream::restore(const StreamPosition& position) {
  start_epoch(position.epoch);
  Record r;
  while (taken_ < position.taken)
    if (!take(&r, /*load=*/false))
      fail(
          "data: the saved position (epoch {}, record {}) is past the end of the epoch ({} "
          "records): the data changed since the checkpoint",
          position.epoch, position.taken, taken_);
  // The records still in the buffer were read without their bytes: read them again.
  std::vector<SampleKey> keys;
  for (const auto& record : buffer_)
    keys.push_back(record.key);
  auto raws = reread(keys);
  for (size_t i = 0; i < buffer_.size(); ++i) {
    if (raws[i].key != buffer_[i].raw.key)
      fail("data: {}: record {} ({}) cannot be read again: the shard changed since the checkpoint",
           shard_name(keys[i].shard), keys[i].ordinal, buffer_[i].raw.key);
    buffer_[i].raw = std::move(raws[i]);
  }
  // The samples before the position were counted by the run that took them.
  usable_in_epoch_ = std::max<int64_t>(usable_in_epoch_, position.taken > 0 ? 1 : 0);
}

std::vector<RawSample> SampleStream::reread(const std::vector<SampleKey>& keys) const {
  std::map<int64_t, std::vector<size_t>> by_shard;
  for (size_t i = 0; i < keys.size(); ++i)
    by_shard[keys[i].shard].push_back(i);
  std::vector<RawSample> out(keys.size());
  for (auto& [shard, slots] : by_shard) {
    std::sort(slots.begin(), slots.end(),
              [&](size_t a, size_t b) { return keys[a].ordinal < keys[b].ordinal; });
    auto reader = open(shard);
    int64_t ordinal = -1;  // of the record last read
    for (size_t slot : slots) {
      const int64_t want = keys[slot].ordinal;
      // Skim up to the record, then read its bytes.
      while (ordinal < want && reader->next(out[slot], /*load=*/ordinal + 1 == want))
        ++ordinal;
      if (ordinal != want)
        fail("data: {}: record {} cannot be read again: the shard changed since the checkpoint",
             shard_name(shard), want);
    }
  }
  return out;
}

std::vector<Sample> SampleStream::load(
    const std::vector<std::pair<int64_t, SampleKey>>& epoch_keys) {
  std::vector<SampleKey> keys;
  for (const auto& [epoch, key] : epoch_keys)
    keys.push_back(key);
  const auto raws = reread(keys);
  std::vector<Sample> out;
  for (size_t i = 0; i < raws.size(); ++i) {
    out.push_back(decode_sample(raws[i], shard_name(keys[i].shard)));
    out.back().where = keys[i];
    out.back().epoch = epoch_keys[i].first;
  }
  return out;
}

}  // namespace lightning::data
