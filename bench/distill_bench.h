// `lightning bench --distill`: a dry run of a whole distillation recipe (every stage and phase,
// with its LoRA, merges, x0 switch, stage hand-overs and stage models) on a random-weight
// pipeline of full size, at a small resolution and a few iterations per phase. It shows that the
// chain runs at that size on the machine, and how long each phase's iteration takes and how
// much memory it peaks at.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lightning::bench {

struct DistillBenchOptions {
  std::string teacher;     // a random preset (sdxl, tiny-sdxl) or a model directory
  std::string recipe;      // the recipe whose stages and [train] settings are run
  int64_t resolution = 0;  // training images (square); 0: 256 for sdxl, 64 otherwise
  int64_t iterations = 1;  // per phase (every phase the recipe has)
  // The recipe's stages to run, numbered from 1, increasing; empty: all. A first stage other
  // than the recipe's own takes the random teacher as its teacher.
  std::vector<int64_t> stages;
  int64_t batch = 1;
  std::string device = "cpu";
  std::string mixed_precision;  // "no" or "bf16"; empty: the recipe's
  std::string vocab;            // the CLIP vocabulary for random presets
  // Where the teacher, the data and the run go; empty: a temporary directory, removed after.
  std::string work_dir;
};

struct DistillBenchRow {
  int64_t stage = 0;
  std::string stage_name, phase;
  int64_t iterations = 0;
  // From the previous phase's last iteration to this phase's first: the set-up (for a stage's
  // first phase the previous stage's model saved and loaded as teacher, the discriminator
  // made; a merge; ...) and the iteration.
  double first_s = 0;
  double seconds = 0;       // median of the later iterations (first_s when there is one)
  double images_per_s = 0;  // batch / seconds
  // Peak memory, the GPU allocator's on CUDA, else RSS: during the first iteration (with the
  // set-up since the previous phase, and on a GPU cuDNN's algorithm search for new shapes), and
  // during the later ones (the first's when there is one).
  double first_peak_gb = 0;
  double peak_memory_gb = 0;
};

// Runs the dry run; `progress` receives a line per step of the preparation and per phase.
std::vector<DistillBenchRow> run_distill_bench(
    const DistillBenchOptions& options, const std::function<void(const std::string&)>& progress);

// A Markdown table of the rows.
std::string format_distill_table(const std::vector<DistillBenchRow>& rows);

// `lightning bench --data`: how fast one reader thread turns shards into training batches (read,
// decode, resize and crop into aspect-ratio buckets, as a BucketBatcher does for each rank).
struct DataBenchOptions {
  // WebDataset shards (a brace pattern), or "synthetic": JPEG photos-sized images (a quarter
  // larger than the buckets, three aspect ratios) written to a temporary directory first.
  std::string shards;
  int64_t resolution = 1024;  // buckets of about resolution² pixels
  double max_aspect = 2.0;
  int64_t batch = 8;
  int64_t warmup = 1, batches = 5;  // untimed, then timed batches
};

struct DataBenchResult {
  int64_t images = 0;
  double seconds = 0;
  double images_per_s = 0;
};

DataBenchResult run_data_bench(const DataBenchOptions& options,
                               const std::function<void(const std::string&)>& progress);

}  // namespace lightning::bench
