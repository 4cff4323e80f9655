#include "distill/trainer.h"

#include <signal.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/error.h"
#include "core/progress.h"
#include "core/system.h"
#include "data/fashion_mnist.h"
#include "diffusion/noise_schedule.h"
#include "dist/group.h"
#include "distill/batches.h"
#include "distill/memory.h"
#include "distill/stage.h"
#include "generate/pipeline.h"
#include "io/files.h"
#include "io/image.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/discriminator.h"
#include "nn/autocast.h"
#include "train/train_util.h"

namespace lightning::distill {
namespace fs = std::filesystem;

namespace {

std::atomic<bool> g_interrupted{false};
extern "C" void on_stop_signal(int) {
  g_interrupted = true;
}

// Turns SIGINT (Ctrl-C) and SIGTERM (what schedulers and the --nproc launcher send before
// killing) into a request to checkpoint and stop, for the lifetime of the object (the previous
// handlers are restored).
class StopSignalGuard {
 public:
  StopSignalGuard() {
    struct sigaction action {};
    action.sa_handler = on_stop_signal;
    action.sa_flags = SA_RESTART;  // reads and writes in progress (any thread) carry on
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &previous_int_);
    sigaction(SIGTERM, &action, &previous_term_);
  }
  ~StopSignalGuard() {
    sigaction(SIGINT, &previous_int_, nullptr);
    sigaction(SIGTERM, &previous_term_, nullptr);
  }
  StopSignalGuard(const StopSignalGuard&) = delete;
  StopSignalGuard& operator=(const StopSignalGuard&) = delete;

 private:
  struct sigaction previous_int_ {
  }, previous_term_{};
};

// Where the global iteration g falls: stage, phase, iteration within the phase.
struct Position {
  size_t stage = 0, phase = 0;
  int64_t iteration = 0;
};

Position locate(const DistillRecipe& recipe, int64_t g) {
  int64_t start = 0;
  for (size_t s = 0; s < recipe.stages.size(); ++s) {
    const auto phases = recipe.stages[s].phases();
    for (size_t p = 0; p < phases.size(); ++p) {
      if (g < start + phases[p].iterations) return {s, p, g - start};
      start += phases[p].iterations;
    }
  }
  // At the very end: the last phase, completed.
  const size_t s = recipe.stages.size() - 1;
  const auto phases = recipe.stages[s].phases();
  return {s, phases.size() - 1, phases.back().iterations};
}

// Iterations before stage s.
int64_t stage_start(const DistillRecipe& recipe, size_t s) {
  int64_t n = 0;
  for (size_t i = 0; i < s; ++i)
    n += recipe.stages[i].total_iterations();
  return n;
}

std::string stage_dir_name(const DistillRecipe& recipe, size_t s) {
  return fmt::format("stage-{}-{}", s + 1, recipe.stages[s].name);
}

// Metrics averaged over a log interval.
struct Interval {
  std::map<std::string, double> sums;
  int64_t count = 0;
  void add(const std::map<std::string, double>& m) {
    for (const auto& [k, v] : m)
      sums[k] += v;
    ++count;
  }
};

// metrics.jsonl, appended a line per log interval, and loss.png, its loss curves (rank 0's).
class MetricsLog {
 public:
  // `kept`: the lines of the run being resumed.
  MetricsLog(const fs::path& out, const std::vector<nlohmann::json>& kept)
      : path_(out / "metrics.jsonl"), plot_(out / "loss.png") {
    file_ = std::fopen(path_.c_str(), "a");
    if (!file_) fail("{}: cannot open for appending", path_.string());
    for (const auto& line : kept)
      add_to_curves(line);
  }
  ~MetricsLog() { std::fclose(file_); }
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void append(const nlohmann::json& line) {
    std::fputs((line.dump() + "\n").c_str(), file_);
    std::fflush(file_);
    add_to_curves(line);
    train::write_curves_png(curves_, plot_.string(), "distillation losses (all stages)", "loss",
                            true);
  }

 private:
  void add_to_curves(const nlohmann::json& line) {
    for (size_t c = 0; c < curves_.size(); ++c)
      if (line.contains(kKeys[c])) {
        curves_[c].x.push_back(line.value("step", 0.0));
        curves_[c].y.push_back(line[kKeys[c]].get<double>());
      }
  }
  // The loss curves and the metric each one plots.
  static constexpr std::array<const char*, 3> kKeys = {"loss_g", "loss_d", "loss_mse"};
  std::vector<train::Curve> curves_ = {
      {"generator", {}, {}}, {"discriminator", {}, {}}, {"mse", {}, {}}};
  fs::path path_, plot_;
  std::FILE* file_ = nullptr;
};

// The ranks' metrics averaged, and whether any rank was interrupted, so that every rank takes
// the same decisions; each rank's compute time (without waiting on the others) is added as
// rank<r>_compute_s, and `data_faults` (each rank's skipped records and damaged shards) become
// the ranks' totals. Returns whether any rank was interrupted.
bool agree_across_ranks(const dist::Group& group, std::map<std::string, double>& m,
                        bool interrupted, double compute_s, std::array<double, 2>& data_faults) {
  if (group.size() == 1) return interrupted;
  std::vector<double> v;
  for (const auto& [name, x] : m)
    v.push_back(x);
  v.push_back(interrupted ? 1 : 0);
  v.insert(v.end(), data_faults.begin(), data_faults.end());
  v.resize(v.size() + static_cast<size_t>(group.size()), 0.0);
  v[m.size() + 3 + static_cast<size_t>(group.rank())] = compute_s;
  v = group.sum(v);
  size_t k = 0;
  for (auto& [name, x] : m)
    x = v[k++] / group.size();
  interrupted = v[k++] > 0;
  for (auto& x : data_faults)
    x = v[k++];
  for (int r = 0; r < group.size(); ++r)
    m[fmt::format("rank{}_compute_s", r)] = v[k++];
  return interrupted;
}

// One distillation run: the checks, then the stages from where the run stands.
class DistillRun {
 public:
  DistillRun(const DistillRecipe& recipe, const DistillOptions& options)
      : recipe_(recipe),
        options_(options),
        group_(options.group ? *options.group : single_),
        main_(group_.is_main()),
        out_(options.out_dir),
        checkpoint_dir_(out_ / "checkpoint"),
        total_(recipe.total_iterations()),
        device_(options.device) {
    load_options_.device = device_;
    load_options_.weights_dtype = recipe.frozen_dtype();
    // Held in f16, a model's fp16 variant files are the same weights, memory-mapped instead of
    // converted (SDXL's repositories hold both); a directory without them gives its only files.
    if (load_options_.weights_dtype == torch::kHalf) load_options_.variant = "fp16";
  }
  DistillResult run();

 private:
  void check_options();
  void create_run_directory();  // rank 0 makes it; every rank checks that it sees it
  void make_run_directory();
  // Loads the recipe's teacher and checks the recipe against it (timesteps, memory).
  void load_teacher_and_check_recipe();
  // Reads the checkpoint's position when resuming and lists the stages finished before it;
  // false when the run is complete already.
  bool read_position();
  // Makes `model_dir` the teacher (the old one's UNet freed first), its text encoder frozen.
  void load_teacher_from(const std::string& model_dir);
  // Train from where the run stands. Both return false when the run stops there (interrupted,
  // or at --until) with its checkpoint written; train_phase returns true at the stage's last
  // iteration in any case, since the stage's end (samples, model, checkpoint) comes first.
  bool train_stage(size_t s);
  bool train_phase(size_t s, size_t p, StageNetworks& nets);
  void finish_stage(size_t s, StageNetworks& nets);
  // The attached LoRA to the stage's lora.safetensors, by rank 0 alone.
  void save_lora(size_t s, StageNetworks& nets);
  DistillResult stopped();
  void log_metrics(size_t s, const Phase& phase, int64_t i, double lr, const Interval& interval);
  void write_samples(size_t s, StageNetworks& nets, int64_t step);
  // A checkpoint inside a phase: the trained state (weights, adapters, moments, averages) and
  // the position. Every rank takes part (data positions, sharded moments); rank 0 writes.
  void write_checkpoint(size_t s, const std::string& phase, StageNetworks& nets,
                        PhaseTrainer& trainer);
  // A checkpoint at a stage's end: the position alone, since the next stage starts from the
  // stage's saved model.
  void write_position(size_t s, const std::string& phase);
  // checkpoint/ replaced by one holding what `trained_state` writes (when set), the data
  // positions and state.json.
  void write_checkpoint_directory(size_t s, const std::string& phase,
                                  const nlohmann::json& data_positions,
                                  const std::function<void(const std::string& dir)>& trained_state);
  double elapsed_s() const {
    return elapsed_before_ +
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }
  fs::path stage_dir(size_t s) const { return out_ / stage_dir_name(recipe_, s); }

  const DistillRecipe& recipe_;
  const DistillOptions& options_;
  const dist::Group single_;
  const dist::Group& group_;
  const bool main_;
  const fs::path out_, checkpoint_dir_;
  const int64_t total_;
  const torch::Device device_;
  std::string recipe_text_;
  models::ModelLoadOptions load_options_;
  generate::TextToImageModel teacher_;
  std::optional<diffusion::NoiseSchedule> schedule_;  // the first teacher's
  std::optional<TrainingBatches> batches_;

  int64_t g_ = 0;     // global iterations done
  int64_t stop_ = 0;  // --until, or the total
  Position start_;    // where this process started
  bool interrupted_ = false;
  std::array<double, 2> data_faults_{};       // all ranks' skipped records and damaged shards
  double elapsed_before_ = 0;                 // by the run before a resume
  std::vector<nlohmann::json> kept_metrics_;  // of the run being resumed
  std::optional<MetricsLog> metrics_;         // rank 0's
  std::optional<ProgressBar> bar_;            // rank 0's
  std::chrono::steady_clock::time_point t0_, interval_start_;
  DistillResult result_;
};

void DistillRun::check_options() {
  if (options_.resume && !fs::exists(checkpoint_dir_ / "state.json"))
    fail_usage("--resume: {} has no checkpoint", (checkpoint_dir_ / "state.json").string());
  if (!options_.resume && (fs::exists(checkpoint_dir_) || fs::exists(out_ / "metrics.jsonl")))
    fail_usage(
        "--out {} already holds a distillation run: pass --resume to continue it or "
        "choose another directory",
        out_.string());
  if (options_.until && *options_.until < 1)
    fail_usage("--until must be >= 1, got {}", *options_.until);
  if (group_.size() > 1 && device_ != group_.device())
    fail("rank {}: the networks are on {} but the process group's collectives on {}", group_.rank(),
         device_.str(), group_.device().str());
  if (recipe_.batch_size % group_.size() != 0)
    fail_usage("{}: [train] batch_size = {} does not split evenly over {} ranks", recipe_.file,
               recipe_.batch_size, group_.size());
  // The recipe's text: checked alike on every rank (not just its name), kept beside the results.
  {
    std::ifstream in(recipe_.file, std::ios::binary);
    recipe_text_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  group_.require_same("the recipe and options",
                      fmt::format("{}\n--out {} --resume {} --until {}", recipe_text_,
                                  out_.string(), options_.resume, options_.until.value_or(0)));
  group_.barrier();  // every rank has checked before rank 0 creates anything
}

void DistillRun::create_run_directory() {
  if (main_) make_run_directory();
  if (group_.size() == 1) return;
  // Every rank reads rank 0's files (each stage's model, the checkpoints): a --out that is not
  // one directory shared by all is refused now rather than after the first stage.
  const auto token_file = out_ / ".rank-0-was-here";
  std::string token;
  if (main_) {
    std::random_device random;
    token = fmt::format("{:08x}{:08x}", random(), random());
    io::write_file_atomic(token_file.string(), token);
  }
  token = group_.all_gather("the run directory check", token)[0];
  if (!main_) {
    // Tries for half the timeout (rank 0 waits the whole of it): a network file system may
    // show a new file to other machines late (NFS: its attribute cache, 30-60 s).
    std::string seen;
    const auto until = std::chrono::steady_clock::now() + group_.timeout() / 2;
    for (;;) {
      io::read_file_bytes(token_file.string(), &seen);
      if (seen == token || std::chrono::steady_clock::now() >= until) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
    if (seen != token)
      fail(
          "rank {}: --out {} does not hold what rank 0 just wrote there ({}): every rank needs the "
          "same run directory (on several machines, a shared file system)",
          group_.rank(), out_.string(), token_file.string());
  }
  group_.barrier();
  std::error_code ec;
  if (main_) fs::remove(token_file, ec);
}

void DistillRun::make_run_directory() {
  std::error_code ec;
  fs::create_directories(out_ / "samples", ec);
  if (ec || !fs::is_directory(out_))
    fail_usage("--out {}: cannot create the run directory ({})", out_.string(), ec.message());
  const auto probe = out_ / ".write-test";
  std::ofstream test(probe);
  if (!test) fail_usage("--out {}: the directory is not writable", out_.string());
  test.close();
  fs::remove(probe, ec);
}

void DistillRun::load_teacher_and_check_recipe() {
  load_teacher_from(generate::resolve_model_dir(recipe_.teacher, options_.models_root));
  if (const auto memory = check_phase_memory(recipe_, teacher_, device_); memory.exceeds())
    spdlog::warn(
        "distill: {}: expect it to run out (docs/benchmarks.md gives each phase's share; "
        "shard_optimizer over several ranks or a LoRA-only recipe needs less)",
        memory.describe());
  else
    spdlog::info("distill: the largest phase: {}", memory.describe());
  schedule_.emplace(teacher_.scheduler);
  const int64_t T = schedule_->num_train_timesteps();
  for (size_t s = 0; s < recipe_.stages.size(); ++s) {
    const auto& st = recipe_.stages[s];
    for (int64_t t : st.timesteps)
      if (t < 0 || t >= T)
        fail("{} [[stages]] #{}: timesteps entry {} is outside [0, {}]", recipe_.file, s + 1, t,
             T - 1);
    for (int64_t t : st.renoise_timesteps)
      if (t < 0 || t >= T)
        fail("{} [[stages]] #{}: renoise_timesteps entry {} is outside [0, {}]", recipe_.file,
             s + 1, t, T - 1);
    if (st.teacher_steps > T)
      fail("{} [[stages]] #{}: teacher_steps {} exceeds the schedule's {} timesteps", recipe_.file,
           s + 1, st.teacher_steps, T);
  }
}

void DistillRun::load_teacher_from(const std::string& model_dir) {
  teacher_.unet = nullptr;  // the old teacher's UNet goes before the new one comes
  teacher_ = generate::load_model(model_dir, load_options_);
  teacher_.text_encoder->eval();  // frozen: captions are encoded without gradients
  for (auto& p : teacher_.text_encoder->parameters())
    p.set_requires_grad(false);
  if (options_.teacher_loaded) options_.teacher_loaded(model_dir, teacher_);
}

bool DistillRun::read_position() {
  if (options_.resume) {
    const auto file = checkpoint_dir_ / "state.json";
    auto state = io::read_json_file(file.string());
    g_ = state.at("iteration").get<int64_t>();
    elapsed_before_ = state.value("elapsed_s", 0.0);
    if (g_ > total_)
      fail("{}: the checkpoint is at iteration {} but the recipe has {} in all", file.string(), g_,
           total_);
    if (main_) kept_metrics_ = train::truncate_metrics((out_ / "metrics.jsonl").string(), g_);
    spdlog::info("distill: resuming {} at iteration {} of {}", out_.string(), g_, total_);
  }
  start_ = locate(recipe_, g_);
  // Stages finished before the start: their students are on disk.
  const size_t done = g_ == total_ ? recipe_.stages.size() : start_.stage;
  for (size_t s = 0; s < done; ++s)
    result_.model_dirs.push_back((stage_dir(s) / "model").string());
  result_.iterations = g_;
  return g_ < total_;
}

DistillResult DistillRun::run() {
  check_options();
  create_run_directory();
  load_teacher_and_check_recipe();
  if (main_ && !recipe_text_.empty())
    io::write_file_atomic((out_ / "recipe.toml").string(), recipe_text_);
  if (!read_position()) {
    spdlog::warn("distill: {} is complete already ({} iterations)", out_.string(), g_);
    return result_;
  }
  // The data, with what is encoded once by the recipe's teacher.
  batches_.emplace(recipe_, teacher_, group_, device_,
                   options_.resume && g_ > 0 ? (checkpoint_dir_ / "data.json").string() : "");
  // The last finished stage's student is the teacher.
  if (start_.stage > 0) load_teacher_from(result_.model_dirs.back());
  if (main_) metrics_.emplace(out_, kept_metrics_);
  kept_metrics_.clear();
  // Images too small for a stage's discriminator head: refused now, not when its phase begins.
  check_discriminator_input(recipe_, teacher_, batches_->smallest_side(), start_.stage);

  stop_ = std::min(total_, options_.until.value_or(total_));
  g_interrupted = false;  // before the handlers: a signal from now on is kept
  StopSignalGuard stop_signals;
  if (main_) bar_.emplace("distill", total_, "it", g_);
  t0_ = interval_start_ = std::chrono::steady_clock::now();
  for (size_t s = start_.stage; s < recipe_.stages.size(); ++s) {
    if (!train_stage(s)) return stopped();
    // The next stage's teacher: this stage's student as saved (what a resumed run loads too;
    // every rank reads rank 0's files, so the run directory is shared by all ranks). Its saving
    // (main_only) ended with every rank past it.
    if (s + 1 == recipe_.stages.size()) break;
    load_teacher_from(result_.model_dirs.back());  // the stage's networks are gone already
  }
  if (bar_) bar_->finish();
  result_.iterations = g_;
  spdlog::info("distill: {} stages done in {}", recipe_.stages.size(),
               format_duration(elapsed_s()));
  return result_;
}

DistillResult DistillRun::stopped() {
  if (interrupted_) {
    if (bar_) bar_->finish();
    if (options_.checkpoints)
      spdlog::warn(
          "distill: interrupted at iteration {}; checkpoint written (continue with --resume)", g_);
    else
      spdlog::warn("distill: interrupted at iteration {} (no checkpoint: checkpoints are off)", g_);
    result_.interrupted = true;
  } else {
    // Rank 0's checkpoint is complete: its writing (main_only) ended with every rank past it.
    if (bar_) bar_->finish();
    spdlog::info("distill: stopped at iteration {} of {} (continue with --resume)", g_, total_);
  }
  result_.iterations = g_;
  return result_;
}

bool DistillRun::train_stage(size_t s) {
  const auto phases = recipe_.stages[s].phases();
  const size_t first_phase = s == start_.stage ? start_.phase : 0;
  StageNetworks nets(recipe_, s, first_phase, teacher_, device_);
  if (s == start_.stage && options_.resume && g_ > stage_start(recipe_, s))
    nets.load_checkpoint(checkpoint_dir_, device_);
  for (size_t p = first_phase; p < phases.size(); ++p) {
    reset_peak_memory(device_);  // the first metrics line's peak includes the LoRA change
    if (!phases[p].lora && nets.lora_attached()) save_lora(s, nets);  // merged as it begins
    nets.begin_phase(phases[p]);
    if (!train_phase(s, p, nets)) return false;
  }
  // The last phase's optimiser state is gone: the stage's end needs the memory of the samples
  // and of the saved model only.
  finish_stage(s, nets);
  if (options_.checkpoints) write_position(s, phases.back().name);
  return !interrupted_ && !(g_ >= stop_ && g_ < total_);
}

bool DistillRun::train_phase(size_t s, size_t p, StageNetworks& nets) {
  const auto& stage = recipe_.stages[s];
  const auto phase = stage.phases()[p];
  const bool last_phase = p + 1 == stage.phases().size();
  const int64_t i0 = s == start_.stage && p == start_.phase ? start_.iteration : 0;
  PhaseTrainer trainer(recipe_, s, p, nets, *schedule_, group_, batches_->rows(), checkpoint_dir_,
                       options_.resume ? i0 : 0);
  Interval interval;
  for (int64_t i = i0; i < phase.iterations && g_ < stop_; ++i) {
    // Randomness per global iteration: exact resume.
    const auto iteration_start = std::chrono::steady_clock::now();
    const double waited_before = group_.collective_seconds();
    group_.heartbeat(g_);
    auto gen = train::torch_generator(train::mix_seed(recipe_.seed, 2, static_cast<uint64_t>(g_)));
    const auto batch = batches_->next(g_, gen, teacher_);
    auto m = trainer.step(batch, batches_->unconditional(batch), gen, i);
    const double compute_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - iteration_start).count() -
        (group_.collective_seconds() - waited_before);
    data_faults_ = batches_->data_faults();
    interrupted_ = agree_across_ranks(group_, m, g_interrupted.load(), compute_s, data_faults_);
    for (const auto& [name, v] : m)
      if (!std::isfinite(v))
        fail(
            "distill: stage {} ({}), phase {}, iteration {}: {} is {}; stopped, the last good "
            "checkpoint is {} (lower the learning rates in {})",
            s + 1, stage.name, phase.name, g_ + 1, name, v, checkpoint_dir_.string(), recipe_.file);
    trainer.update_average();
    interval.add(m);
    ++g_;
    if (bar_)
      bar_->update(g_, fmt::format("stage {} {} {}", s + 1, phase.name,
                                   !phase.adversarial() ? fmt::format("mse {:.4f}", m["loss_mse"])
                                   : phase.train_generator
                                       ? fmt::format("G {:.3f} D {:.3f}", m["loss_g"], m["loss_d"])
                                       : fmt::format("D {:.3f}", m["loss_d"])));
    const bool phase_done = i + 1 == phase.iterations;
    if (phase_done) trainer.hand_on_average();
    if (main_ && (g_ % recipe_.log_every == 0 || phase_done || g_ == stop_)) {
      log_metrics(s, phase, i, trainer.learning_rate(), interval);
      interval = Interval{};
    }
    // The stage's end (samples, model, checkpoint) comes once the phase's state is freed.
    if (phase_done && last_phase) return true;
    if (g_ % recipe_.sample_every == 0)
      group_.main_only("writing sample images", [&] { write_samples(s, nets, g_); });
    if (options_.checkpoints && (g_ % recipe_.checkpoint_every == 0 || g_ == stop_ || interrupted_))
      write_checkpoint(s, phase.name, nets, trainer);
    if (interrupted_) return false;
  }
  return !(g_ >= stop_ && g_ < total_);
}

void DistillRun::finish_stage(size_t s, StageNetworks& nets) {
  const auto& stage = recipe_.stages[s];
  const auto dir = stage_dir(s);
  if (nets.lora_attached()) save_lora(s, nets);
  nets.end_training();
  // The phase's optimiser state and gradients are gone (SDXL: about 46 GB), and the next stage
  // holds other tensors: the heap that held them goes back to the system.
  release_free_memory(device_);
  // Rank 0 alone, for as long as it takes (the others wait while it shows signs of life).
  group_.main_only("writing the stage's samples and model", [&] {
    write_samples(s, nets, g_);
    nets.student()->eval();
    generate::save_model(nets.student_model(), (dir / "model").string(), torch::kFloat16);
  });
  nets.student()->eval();
  result_.model_dirs.push_back((dir / "model").string());
  spdlog::info("distill: stage {} ({}) done: {}", s + 1, stage.name, (dir / "model").string());
}

void DistillRun::save_lora(size_t s, StageNetworks& nets) {
  group_.main_only("writing the stage's LoRA",
                   [&] { nets.save_lora((stage_dir(s) / "lora.safetensors").string()); });
}

void DistillRun::log_metrics(size_t s, const Phase& phase, int64_t i, double lr,
                             const Interval& interval) {
  const auto& stage = recipe_.stages[s];
  const auto now = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(now - interval_start_).count();
  interval_start_ = now;
  nlohmann::json line = {
      {"step", g_},
      {"stage", s + 1},
      {"stage_name", stage.name},
      {"phase", phase.name},
      {"iteration", i + 1},
      {"lr", lr},
      {"images_per_s", interval.count * recipe_.batch_size / std::max(secs, 1e-9)},
      // This process's peak since the previous line (the first: since the phase began): the
      // GPU allocator's, else RSS. Per line, so that the first iteration's one-off peaks
      // (cuDNN's algorithm search on a GPU) do not hide the phase's steady state.
      {"peak_memory_gb", peak_memory_bytes(device_) / 1e9},
      {"elapsed_s", elapsed_s()}};
  if (group_.size() > 1) line["ranks"] = group_.size();
  if (batches_->streamed()) {
    batches_->add_position(line);                                  // rank 0's epoch
    line["data_skipped"] = static_cast<int64_t>(data_faults_[0]);  // all ranks', since the start
    line["data_damaged_shards"] = static_cast<int64_t>(data_faults_[1]);
  }
  if (phase.adversarial()) line["lr_d"] = stage.discriminator_learning_rate;
  for (const auto& [k, v] : interval.sums)
    line[k] = v / interval.count;
  metrics_->append(line);
  reset_peak_memory(device_, /*release_free=*/false);
}

void DistillRun::write_samples(size_t s, StageNetworks& nets, int64_t step) {
  if (!main_) return;
  const auto& stage = recipe_.stages[s];
  torch::NoGradGuard no_grad;
  // In the training's precision, as diffusers' validation images are: under bf16 autocast
  // with mixed_precision = "bf16" (on a GPU several times faster than float32 at 1024²).
  const nn::AutocastScope autocast(
      nn::AutocastState::bf16_or_current(recipe_.mixed_precision == "bf16"));
  nets.student()->eval();
  generate::GenerateRequest req;
  std::vector<std::string> prompts = recipe_.sample_prompts;
  for (int64_t c = 0; prompts.empty() && c < data::kFashionMnistClasses; ++c)
    prompts.push_back(data::class_prompt(c));
  for (const auto& prompt : prompts)
    for (int64_t k = 0; k < recipe_.sample_per_class; ++k)
      req.prompts.push_back(prompt);
  req.steps = stage.student_steps;
  req.guidance_scale = 1.0;
  req.sampler = diffusion::SamplerKind::kEuler;
  req.seed = recipe_.sample_seed;
  if (recipe_.resolution > 0) req.height = req.width = recipe_.resolution;  // the trained size
  auto images = generate::generate(nets.student_model(), req);
  nets.student()->train();
  auto grid = io::make_grid(io::to_uint8_image(images), recipe_.sample_per_class, 2, 255);
  io::write_png(
      (out_ / "samples" / fmt::format("{:06d}-stage{}-{}.png", step, s + 1, stage.name)).string(),
      grid,
      {{"parameters", fmt::format("stage {} ({}), iteration {}, {} steps, Euler, no CFG; rows: "
                                  "the sample prompts",
                                  s + 1, stage.name, step, stage.student_steps)}});
}

void DistillRun::write_checkpoint(size_t s, const std::string& phase, StageNetworks& nets,
                                  PhaseTrainer& trainer) {
  const auto data_positions = batches_->gather_positions(group_);
  const auto state = trainer.gather_state();
  write_checkpoint_directory(s, phase, data_positions, [&](const std::string& dir) {
    nets.save_checkpoint(dir);
    if (!state.average.empty())
      io::save_safetensors(dir + "/student_ema.safetensors", state.average);
    io::save_safetensors(dir + "/student_optimizer.safetensors", state.student_adam);
    io::save_safetensors(dir + "/discriminator_optimizer.safetensors", state.discriminator_adam);
  });
}

void DistillRun::write_position(size_t s, const std::string& phase) {
  write_checkpoint_directory(s, phase, batches_->gather_positions(group_), {});
}

void DistillRun::write_checkpoint_directory(
    size_t s, const std::string& phase, const nlohmann::json& data_positions,
    const std::function<void(const std::string& dir)>& trained_state) {
  group_.main_only("writing a checkpoint", [&] {
    io::write_directory_atomic(checkpoint_dir_.string(), [&](const std::string& tmp) {
      if (trained_state) trained_state(tmp);
      if (!data_positions.is_null())
        io::write_json_file(tmp + "/data.json", {{"ranks", data_positions}});
      io::write_json_file(tmp + "/state.json", {{"iteration", g_},
                                                {"elapsed_s", elapsed_s()},
                                                {"stage", s + 1},
                                                {"phase", phase},
                                                {"total_iterations", total_}});
    });
  });
}

}  // namespace

void check_discriminator_input(const DistillRecipe& recipe,
                               const generate::TextToImageModel& teacher, int64_t smallest_side,
                               size_t first_stage) {
  for (size_t s = first_stage; s < recipe.stages.size(); ++s) {
    const auto& stage = recipe.stages[s];
    if (!stage.has_adversarial_phase()) continue;
    const int64_t need = models::smallest_discriminator_input(teacher.unet->config, stage.head) *
                         teacher.vae_scale();
    if (smallest_side < need)
      fail_usage(
          "{} [[stages]] #{}: {}-pixel image sides leave too few features for head_blocks = {} "
          "(each block halves them): use images of at least {} pixels a side, or fewer blocks",
          recipe.file, s + 1, smallest_side, stage.head.blocks, need);
  }
}

DistillResult run_distillation(const DistillRecipe& recipe, const DistillOptions& options) {
  return DistillRun(recipe, options).run();
}

}  // namespace lightning::distill
