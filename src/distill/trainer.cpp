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
#include <map>
#include <optional>
#include <random>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/error.h"
#include "core/progress.h"
#include "core/system.h"
#include "data/buckets.h"
#include "data/fashion_mnist.h"
#include "data/stream.h"
#include "diffusion/noise_schedule.h"
#include "diffusion/parameterization.h"
#include "dist/group.h"
#include "distill/memory.h"
#include "distill/objectives.h"
#include "generate/pipeline.h"
#include "io/files.h"
#include "io/image.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/discriminator.h"
#include "models/lora.h"
#include "nn/autocast.h"
#include "train/cache.h"
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

double total_norm(const std::vector<torch::Tensor>& params) {
  double sum = 0;
  for (const auto& p : params)
    if (p.grad().defined()) sum += p.grad().to(torch::kFloat64).square().sum().item<double>();
  return std::sqrt(sum);
}

double clip(const std::vector<torch::Tensor>& params, double max_norm) {
  if (max_norm > 0) return torch::nn::utils::clip_grad_norm_(params, max_norm);
  return total_norm(params);
}

// Zeroes the gradients of every parameter (not only those of an optimiser, which with sharded
// state holds just this rank's share).
void zero_grads(const std::vector<torch::Tensor>& params) {
  for (auto p : params)
    if (p.grad().defined()) {
      p.mutable_grad().detach_();
      p.mutable_grad().zero_();
    }
}

torch::optim::Adam make_adam(const std::vector<torch::Tensor>& params, double lr, double beta1,
                             double beta2) {
  return torch::optim::Adam(params, torch::optim::AdamOptions(lr).betas({beta1, beta2}).eps(1e-8));
}

std::vector<torch::Tensor> values(const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  std::vector<torch::Tensor> out;
  for (const auto& [name, t] : named)
    out.push_back(t);
  return out;
}

// The UNet inputs: text context, and for SDXL the pooled embeddings and time ids.
models::UNetInputs unet_inputs(const torch::Tensor& x, const torch::Tensor& t,
                               const Conditioning& c) {
  models::UNetInputs in;
  in.sample = x;
  in.timestep = t;
  in.encoder_hidden_states = c.context;
  in.text_embeds = c.pooled;
  in.time_ids = c.time_ids;
  return in;
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
  const dist::Group single;
  const dist::Group& group = options.group ? *options.group : single;
  const bool main_rank = group.is_main();
  const fs::path out(options.out_dir);
  const fs::path checkpoint_dir = out / "checkpoint";
  const fs::path metrics_path = out / "metrics.jsonl";
  const int64_t total = recipe.total_iterations();

  // ---- Checks before any work.
  if (options.resume && !fs::exists(checkpoint_dir / "state.json"))
    fail_usage("--resume: {} has no checkpoint", (checkpoint_dir / "state.json").string());
  if (!options.resume && (fs::exists(checkpoint_dir) || fs::exists(metrics_path)))
    fail_usage(
        "--out {} already holds a distillation run: pass --resume to continue it or "
        "choose another directory",
        out.string());
  if (options.until && *options.until < 1)
    fail_usage("--until must be >= 1, got {}", *options.until);
  const torch::Device device = options.device;
  if (group.size() > 1 && device != group.device())
    fail("rank {}: the networks are on {} but the process group's collectives on {}", group.rank(),
         device.str(), group.device().str());
  if (recipe.batch_size % group.size() != 0)
    fail_usage("{}: [train] batch_size = {} does not split evenly over {} ranks", recipe.file,
               recipe.batch_size, group.size());
  // The recipe's text: checked alike on every rank (not just its name), kept beside the results.
  std::string recipe_text;
  {
    std::ifstream in(recipe.file, std::ios::binary);
    recipe_text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  group.require_same("the recipe and options",
                     fmt::format("{}\n--out {} --resume {} --until {}", recipe_text, out.string(),
                                 options.resume, options.until.value_or(0)));
  group.barrier();  // every rank has checked before rank 0 creates anything
  if (main_rank) {
    std::error_code ec;
    fs::create_directories(out / "samples", ec);
    if (ec || !fs::is_directory(out))
      fail_usage("--out {}: cannot create the run directory ({})", out.string(), ec.message());
    const auto probe = out / ".write-test";
    std::ofstream test(probe);
    if (!test) fail_usage("--out {}: the directory is not writable", out.string());
    test.close();
    fs::remove(probe, ec);
  }

  const auto teacher_dir = generate::resolve_model_dir(recipe.teacher, options.models_root);
  models::ModelLoadOptions load_options;
  load_options.device = device;
  auto teacher = generate::load_model(teacher_dir, load_options);
  if (options.teacher_loaded) options.teacher_loaded(teacher_dir);
  if (const auto memory = check_phase_memory(recipe, teacher, device); memory.exceeds())
    spdlog::warn(
        "distill: {}: expect it to run out (docs/benchmarks.md gives each phase's share; "
        "shard_optimizer over several ranks or a LoRA-only recipe needs less)",
        memory.describe());
  else
    spdlog::info("distill: the largest phase: {}", memory.describe());
  const diffusion::NoiseSchedule schedule(teacher.scheduler);
  const int64_t T = schedule.num_train_timesteps();
  for (size_t s = 0; s < recipe.stages.size(); ++s) {
    const auto& st = recipe.stages[s];
    for (int64_t t : st.timesteps)
      if (t < 0 || t >= T)
        fail("{} [[stages]] #{}: timesteps entry {} is outside [0, {}]", recipe.file, s + 1, t,
             T - 1);
    for (int64_t t : st.renoise_timesteps)
      if (t < 0 || t >= T)
        fail("{} [[stages]] #{}: renoise_timesteps entry {} is outside [0, {}]", recipe.file, s + 1,
             t, T - 1);
    if (st.teacher_steps > T)
      fail("{} [[stages]] #{}: teacher_steps {} exceeds the schedule's {} timesteps", recipe.file,
           s + 1, st.teacher_steps, T);
  }
  if (main_rank && !recipe_text.empty())
    io::write_file_atomic((out / "recipe.toml").string(), recipe_text);

  // ---- Data, captions and their (frozen) text encodings. Fashion-MNIST is held in memory and
  // its class captions encoded once; streamed data (tar shards, an image folder) comes in
  // bucketed batches whose captions are encoded as they arrive.
  const bool streamed = recipe.dataset != "fashion-mnist";
  data::FashionMnist dataset;
  if (!streamed) dataset = data::load_fashion_mnist(data::Split::kTrain, recipe.data_dir);
  const auto pixels = streamed ? torch::Tensor() : data::to_model_pixels(dataset.images);
  const auto labels = dataset.labels;
  const int64_t templates = static_cast<int64_t>(data::caption_templates().size());
  teacher.text_encoder->eval();
  for (auto& p : teacher.text_encoder->parameters())
    p.set_requires_grad(false);
  torch::Tensor caption_context;
  generate::PromptEmbeds empty;  // the unconditional branch: "" (zeros for SDXL)
  {
    torch::NoGradGuard no_grad;
    if (!streamed) {
      std::vector<std::string> captions;
      for (int64_t c = 0; c < data::kFashionMnistClasses; ++c)
        for (int64_t k = 0; k < templates; ++k)
          captions.push_back(data::caption(c, static_cast<size_t>(k)));
      caption_context = generate::encode_prompts(teacher, captions);  // [10 * templates, L, D]
    }
    empty = generate::encode_negative(teacher, "");  // [1, L, D]
  }

  // ---- State: where to start.
  int64_t g = 0;
  double elapsed_before = 0;
  std::vector<nlohmann::json> kept_metrics;  // of the run being resumed
  if (options.resume) {
    auto state = io::read_json_file((checkpoint_dir / "state.json").string());
    g = state.at("iteration").get<int64_t>();
    elapsed_before = state.value("elapsed_s", 0.0);
    if (g > total)
      fail("{}: the checkpoint is at iteration {} but the recipe has {} in all",
           (checkpoint_dir / "state.json").string(), g, total);
    if (main_rank) kept_metrics = train::truncate_metrics(metrics_path.string(), g);
    spdlog::info("distill: resuming {} at iteration {} of {}", out.string(), g, total);
  }
  DistillResult result;
  if (g == total) {
    for (size_t s = 0; s < recipe.stages.size(); ++s)
      result.model_dirs.push_back((out / stage_dir_name(recipe, s) / "model").string());
    result.iterations = g;
    spdlog::warn("distill: {} is complete already ({} iterations)", out.string(), g);
    return result;
  }
  const Position start = locate(recipe, g);
  // Stages finished before the start: their students are on disk; the last is the teacher.
  for (size_t s = 0; s < start.stage; ++s)
    result.model_dirs.push_back((out / stage_dir_name(recipe, s) / "model").string());
  if (start.stage > 0) {
    teacher = generate::load_model(result.model_dirs.back(), load_options);
    teacher.text_encoder->eval();
    if (options.teacher_loaded) options.teacher_loaded(result.model_dirs.back());
  }

  std::FILE* metrics = main_rank ? std::fopen(metrics_path.c_str(), "a") : nullptr;
  if (main_rank && !metrics) fail("{}: cannot open for appending", metrics_path.string());
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> metrics_guard(
      metrics, [](std::FILE* f) { return f ? std::fclose(f) : 0; });
  // The loss curves of loss.png and the metric each one plots.
  std::vector<train::Curve> curves = {
      {"generator", {}, {}}, {"discriminator", {}, {}}, {"mse", {}, {}}};
  const std::array<const char*, 3> curve_keys = {"loss_g", "loss_d", "loss_mse"};
  auto add_to_curves = [&](const nlohmann::json& line) {
    for (size_t c = 0; c < curves.size(); ++c)
      if (line.contains(curve_keys[c])) {
        curves[c].x.push_back(line.value("step", 0.0));
        curves[c].y.push_back(line[curve_keys[c]].get<double>());
      }
  };
  for (const auto& line : kept_metrics)
    add_to_curves(line);

  train::EpochSampler sampler(streamed ? 1 : pixels.size(0), recipe.seed);
  const int64_t stop = std::min(total, options.until.value_or(total));
  // The global batch B is drawn alike on every rank; this rank trains on rows [b0, b0 + b).
  const int64_t B = recipe.batch_size;
  const int64_t b = B / group.size(), b0 = b * group.rank();
  auto local = [&](const torch::Tensor& global) { return global.narrow(0, b0, b); };
  // Streamed data: each rank reads its own shards into batches of b from one bucket.
  std::optional<data::SampleStream> stream;
  std::optional<data::BucketBatcher> batcher;
  std::optional<data::BatchPrefetcher> prefetcher;  // reads ahead from `batcher`
  // The smallest image side training sees (the discriminator heads need enough of it).
  int64_t smallest_side = streamed ? 0 : std::min(pixels.size(2), pixels.size(3));
  if (streamed) {
    auto source = recipe.source;
    int64_t resolution = recipe.resolution > 0 ? recipe.resolution : teacher.sample_size();
    double max_aspect = recipe.max_aspect;
    if (recipe.dataset == "cache") {  // encoded already, in the cache's buckets
      const auto index = train::read_cache_index(recipe.data_dir, teacher);
      source.shards = (fs::path(recipe.data_dir) / index.at("shards").get<std::string>()).string();
      resolution = index.at("resolution").get<int64_t>();
      max_aspect = index.at("max_aspect").get<double>();
    }
    stream.emplace(source, group.rank(), group.size());
    data::BatcherOptions batching;
    batching.batch_size = b;
    batching.channels = teacher.image_channels();
    batching.buckets = data::make_buckets(resolution, teacher.size_multiple(), max_aspect);
    smallest_side = resolution;
    for (const auto& bucket : batching.buckets)
      smallest_side = std::min({smallest_side, bucket.height, bucket.width});
    batching.random_crop = recipe.random_crop;
    batching.seed = recipe.seed;
    batcher.emplace(*stream, batching);
    const auto data_file = checkpoint_dir / "data.json";
    if (options.resume && g > 0) {
      if (!fs::exists(data_file))
        fail("{}: missing; the checkpoint was not made with streamed data", data_file.string());
      const auto saved = io::read_json_file(data_file.string()).at("ranks");
      if (static_cast<int>(saved.size()) != group.size())
        fail("{}: the data position was saved by {} rank(s); resume with {}", data_file.string(),
             saved.size(), saved.size());
      batcher->restore(saved.at(static_cast<size_t>(group.rank())));
    }
    prefetcher.emplace(*batcher, recipe.prefetch);
    spdlog::info("data: {} shard(s), {} bucket(s) of about {}x{} pixels, batches of {} per rank",
                 stream->num_shards(), batching.buckets.size(),
                 batching.buckets[batching.buckets.size() / 2].height,
                 batching.buckets[batching.buckets.size() / 2].width, b);
  }
  // Images too small for a stage's discriminator head: refused now, not when its phase begins.
  check_discriminator_input(recipe, teacher, smallest_side, start.stage);
  g_interrupted = false;  // before the handlers: a signal from now on is kept
  StopSignalGuard stop_signals;
  std::optional<ProgressBar> bar;  // rank 0's
  if (main_rank) bar.emplace("distill", total, "it", g);
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed_s = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  auto interval_start = std::chrono::steady_clock::now();

  for (size_t s = start.stage; s < recipe.stages.size(); ++s) {
    const auto& stage = recipe.stages[s];
    const auto phases = stage.phases();
    const fs::path stage_dir = out / stage_dir_name(recipe, s);
    const bool resuming_here = s == start.stage && options.resume;
    const auto teacher_type = teacher.scheduler.prediction_type;
    teacher.unet->eval();
    for (auto& p : teacher.unet->parameters())
      p.set_requires_grad(false);

    // The student: a copy of the teacher, or where this stage's training starts with LoRA, a
    // UNet sharing the teacher's frozen weights (no second copy) until its full phase; the
    // discriminator: a copy of the teacher's encoder.
    const size_t start_phase = s == start.stage ? start.phase : 0;
    const bool sharing = phases[start_phase].lora;
    models::UNet2DConditionModel student{nullptr};
    if (sharing) {
      student = train::unet_sharing_weights(teacher.unet);
    } else {
      student = models::UNet2DConditionModel(
          std::dynamic_pointer_cast<models::UNet2DConditionModelImpl>(teacher.unet->clone()));
      for (auto& p : student->parameters())
        p.set_requires_grad(true);
    }
    bool shares_teacher = sharing;
    student->gradient_checkpointing = recipe.gradient_checkpointing;
    student->train();
    // The discriminator, in stages with adversarial phases only (for SDXL 1.3 B parameters that
    // an MSE stage need not hold).
    torch::manual_seed(train::mix_seed(recipe.seed, 11, s));
    models::Discriminator disc{nullptr};
    if (stage.has_adversarial_phase()) {
      disc = models::Discriminator(teacher.unet->config, stage.head);
      disc->init_backbone_from(teacher.unet);
      disc->backbone->gradient_checkpointing = recipe.gradient_checkpointing;
      disc->to(device);
      disc->train();
    }
    bool lora_attached = false;
    if (resuming_here && g > stage_start(recipe, s)) {
      // A sharing student's base weights are the teacher's (frozen since the stage began).
      if (!sharing)
        train::load_trainable_weights(*student, (checkpoint_dir / "student.safetensors").string(),
                                      device);
      if (disc)
        train::load_trainable_weights(
            *disc, (checkpoint_dir / "discriminator.safetensors").string(), device);
      if (fs::exists(checkpoint_dir / "lora.safetensors")) {
        models::attach_lora(*student,
                            {stage.lora_rank, stage.lora_alpha, models::LoRAConfig{}.exclude});
        io::SafetensorsFile file((checkpoint_dir / "lora.safetensors").string());
        torch::NoGradGuard no_grad;
        for (auto& [name, t] : models::lora_parameters(*student))
          t.copy_(file.get(name));
        lora_attached = true;
      }
    }

    // Generation with the current student (samples), at the stage's step count.
    generate::TextToImageModel student_model = teacher;
    student_model.unet = student;
    student_model.scheduler.prediction_type = stage.prediction_type;
    student_model.scheduler.timestep_spacing = diffusion::TimestepSpacing::kTrailing;
    student_model.recommended = {stage.student_steps, 1.0, diffusion::SamplerKind::kEuler};
    student_model.name = stage.name;
    auto write_samples = [&](int64_t step) {
      if (!main_rank) return;
      torch::NoGradGuard no_grad;
      student->eval();
      generate::GenerateRequest req;
      std::vector<std::string> prompts = recipe.sample_prompts;
      for (int64_t c = 0; prompts.empty() && c < data::kFashionMnistClasses; ++c)
        prompts.push_back(data::class_prompt(c));
      for (const auto& prompt : prompts)
        for (int64_t k = 0; k < recipe.sample_per_class; ++k)
          req.prompts.push_back(prompt);
      req.steps = stage.student_steps;
      req.guidance_scale = 1.0;
      req.sampler = diffusion::SamplerKind::kEuler;
      req.seed = recipe.sample_seed;
      if (recipe.resolution > 0) req.height = req.width = recipe.resolution;  // the trained size
      auto images = generate::generate(student_model, req);
      student->train();
      auto grid = io::make_grid(io::to_uint8_image(images), recipe.sample_per_class, 2, 255);
      io::write_png(
          (out / "samples" / fmt::format("{:06d}-stage{}-{}.png", step, s + 1, stage.name))
              .string(),
          grid,
          {{"parameters", fmt::format("stage {} ({}), iteration {}, {} steps, Euler, no "
                                      "CFG; rows: the sample prompts",
                                      s + 1, stage.name, step, stage.student_steps)}});
    };

    // The networks' forward passes (in bf16 under mixed precision; outputs in float32).
    const bool bf16 = recipe.mixed_precision == "bf16";
    auto student_fn = [&](const torch::Tensor& x, const torch::Tensor& t, const Conditioning& c) {
      const nn::AutocastScope autocast(bf16 ? nn::AutocastState::bf16()
                                            : nn::AutocastState::current());
      return student->forward(unet_inputs(x, t, c)).to(torch::kFloat32);
    };
    ConditionedModel teacher_fn = [&](const torch::Tensor& x, const torch::Tensor& t,
                                      const Conditioning& c) {
      const nn::AutocastScope autocast(bf16 ? nn::AutocastState::bf16()
                                            : nn::AutocastState::current());
      return teacher.unet->forward(unet_inputs(x, t, c)).to(torch::kFloat32);
    };
    auto d_features = [&](const torch::Tensor& x, const torch::Tensor& t, const Conditioning& c) {
      const nn::AutocastScope autocast(bf16 ? nn::AutocastState::bf16()
                                            : nn::AutocastState::current());
      return disc->features(unet_inputs(x, t, c));
    };
    const auto grid = stage.timesteps.empty()
                          ? diffusion::trailing_timesteps(T, stage.student_steps)
                          : stage.timesteps;
    const auto grid_tensor = torch::tensor(grid, torch::kInt64);

    // The stage's LoRA as a kohya file (applies to this stage's teacher), then merged.
    auto save_and_merge_lora = [&] {
      if (main_rank) {
        fs::create_directories(stage_dir);
        models::save_kohya_lora(*student, (stage_dir / "lora.safetensors").string(), "lora_unet_",
                                c10::nullopt,
                                {{"ss_network_dim", std::to_string(stage.lora_rank)},
                                 {"ss_network_alpha", fmt::format("{:g}", stage.lora_alpha)},
                                 {"lightning_stage", stage.name}});
      }
      models::merge_lora(*student);
      lora_attached = false;
    };

    const size_t first_phase = s == start.stage ? start.phase : 0;
    for (size_t p = first_phase; p < phases.size(); ++p) {
      const auto& phase = phases[p];
      const int64_t phase_start_g =
          g - ((s == start.stage && p == start.phase) ? start.iteration : 0);
      const int64_t i0 = g - phase_start_g;
      reset_peak_memory(device);  // the metrics' peak is the phase's
      // LoRA on or off for this phase.
      if (phase.lora) {  // the base weights are frozen under a LoRA
        for (auto& q : student->parameters())
          q.set_requires_grad(false);
        if (!lora_attached) {
          torch::manual_seed(train::mix_seed(recipe.seed, 10, s));
          models::attach_lora(*student,
                              {stage.lora_rank, stage.lora_alpha, models::LoRAConfig{}.exclude});
          lora_attached = true;
        }
      } else if (lora_attached) {  // the full phase: keep the LoRA, merge it, train everything
        save_and_merge_lora();
        if (shares_teacher) {  // from here the student's weights diverge from the teacher's
          train::own_weights(*student);
          shares_teacher = false;
        }
        for (auto& q : student->parameters())
          q.set_requires_grad(true);
      }
      const auto student_named =
          phase.lora ? models::lora_parameters(*student) : train::named_params(*student, "");
      const auto student_params = values(student_named);
      const auto disc_named = disc ? train::named_params(*disc, "")
                                   : std::vector<std::pair<std::string, torch::Tensor>>{};
      const auto disc_params = values(disc_named);
      {  // identical starting points on every rank (they are already, by construction)
        auto all = student_params;
        all.insert(all.end(), disc_params.begin(), disc_params.end());
        group.broadcast(all);
      }
      double lr = stage.learning_rate;
      if (phase.name == "full" && stage.full_learning_rate > 0) lr = stage.full_learning_rate;
      if (phase.objective == Objective::kX0Warmup && stage.x0_warmup_learning_rate > 0)
        lr = stage.x0_warmup_learning_rate;
      // Optimiser state for all parameters, or (sharded) for this rank's share of them.
      std::optional<train::OptimizerShards> g_shards, d_shards;
      if (recipe.shard_optimizer && group.size() > 1) {
        g_shards.emplace(student_params, group.size());
        d_shards.emplace(disc_params, group.size());
      }
      const auto g_opt_named =
          g_shards ? g_shards->mine(student_named, group.rank()) : student_named;
      const auto d_opt_named = d_shards ? d_shards->mine(disc_named, group.rank()) : disc_named;
      auto g_opt = make_adam(values(g_opt_named), lr, stage.adam_beta1, stage.adam_beta2);
      auto d_opt = make_adam(values(d_opt_named), stage.discriminator_learning_rate,
                             stage.discriminator_beta1, stage.discriminator_beta2);
      if (resuming_here && i0 > 0) {
        train::restore_adam_state(g_opt, g_opt_named,
                                  (checkpoint_dir / "student_optimizer.safetensors").string(), i0,
                                  false);
        if (phase.adversarial())
          train::restore_adam_state(
              d_opt, d_opt_named, (checkpoint_dir / "discriminator_optimizer.safetensors").string(),
              i0 * stage.discriminator_steps, false);
      }
      const bool adversarial = phase.adversarial();
      // The student's adversarial iterations (those of the re-noising weights' switch): in all,
      // and those of this stage before this phase.
      const int64_t adversarial_total =
          stage.conditional_iterations + stage.unconditional_iterations + stage.full_iterations;
      int64_t adversarial_before = 0;
      for (size_t q = 0; q < p; ++q)
        if (phases[q].adversarial() && phases[q].train_generator)
          adversarial_before += phases[q].iterations;

      // The student's averaged parameters (ema_decay > 0), in the order of student_params.
      std::vector<torch::Tensor> ema;
      if (stage.ema_decay > 0 && phase.train_generator) {
        const auto ema_file = checkpoint_dir / "student_ema.safetensors";
        std::optional<io::SafetensorsFile> saved;
        if (resuming_here && i0 > 0) saved.emplace(ema_file.string());
        for (const auto& [name, t] : student_named)
          ema.push_back(saved ? saved->get(name).to(t.device()).clone() : t.detach().clone());
      }

      auto write_checkpoint = [&](int64_t step) {
        // Every rank's data position (all ranks take part; rank 0 writes them).
        nlohmann::json data_state;
        if (batcher) {
          data_state = nlohmann::json::array();
          for (const auto& r : group.all_gather("data position", prefetcher->state().dump()))
            data_state.push_back(nlohmann::json::parse(r));
        }
        const auto g_state = g_shards ? g_shards->gather_state(g_opt, student_named, group)
                                      : train::adam_state_tensors(g_opt, student_named);
        const auto d_state = d_shards ? d_shards->gather_state(d_opt, disc_named, group)
                                      : train::adam_state_tensors(d_opt, disc_named);
        if (!main_rank) return;
        io::write_directory_atomic(checkpoint_dir.string(), [&](const std::string& tmp) {
          // Base weights (adapters are not part of the state dict) and adapters separately.
          io::save_weights(*student, tmp + "/student.safetensors");
          if (disc) io::save_weights(*disc, tmp + "/discriminator.safetensors");
          if (lora_attached) {
            std::vector<std::pair<std::string, torch::Tensor>> lora;
            for (auto& [name, t] : models::lora_parameters(*student))
              lora.emplace_back(name, t.detach());
            io::save_safetensors(tmp + "/lora.safetensors", lora);
          }
          if (!ema.empty()) {
            std::vector<std::pair<std::string, torch::Tensor>> averages;
            for (size_t k = 0; k < ema.size(); ++k)
              averages.emplace_back(student_named[k].first, ema[k]);
            io::save_safetensors(tmp + "/student_ema.safetensors", averages);
          }
          io::save_safetensors(tmp + "/student_optimizer.safetensors", g_state);
          io::save_safetensors(tmp + "/discriminator_optimizer.safetensors", d_state);
          if (batcher) io::write_json_file(tmp + "/data.json", {{"ranks", data_state}});
          io::write_json_file(tmp + "/state.json", {{"iteration", step},
                                                    {"elapsed_s", elapsed_before + elapsed_s()},
                                                    {"stage", s + 1},
                                                    {"phase", phase.name},
                                                    {"total_iterations", total}});
        });
      };

      // One MSE update of the student (the mse and x0_warmup objectives).
      auto mse_update = [&](const torch::Tensor& prediction, const torch::Tensor& target,
                            std::map<std::string, double>& m) {
        auto loss = torch::mse_loss(prediction, target);
        zero_grads(student_params);
        loss.backward();
        group.average_gradients(student_params);
        m["grad_norm_g"] = clip(student_params, recipe.max_grad_norm);
        g_opt.step();
        if (g_shards) g_shards->sync(student_params, group);
        m["loss_mse"] = loss.item<double>();
      };

      Interval interval;
      for (int64_t i = i0; i < phase.iterations && g < stop; ++i) {
        // ---- The batch (randomness per global iteration: exact resume).
        // Every draw is of the global batch (the same stream for any number of ranks); each
        // rank then keeps its rows.
        const auto iteration_start = std::chrono::steady_clock::now();
        const double waited_before = group.collective_seconds();
        group.heartbeat(g);
        auto gen =
            train::torch_generator(train::mix_seed(recipe.seed, 2, static_cast<uint64_t>(g)));
        torch::Tensor x0;
        Conditioning context;
        double data_wait_s = 0;  // streamed data: blocked waiting for the reader thread
        if (streamed) {
          const auto wait_start = std::chrono::steady_clock::now();
          auto batch = prefetcher->next();
          data_wait_s =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
          torch::NoGradGuard no_grad;
          if (batch.cached) {
            x0 = batch.pixels.to(device);
            context.context = batch.context.to(device);
            if (batch.pooled.defined()) context.pooled = batch.pooled.to(device);
            if (batch.context.dim() != 3 || batch.context.size(2) != empty.context.size(2))
              fail(
                  "{}: the cached text encodings are {}-wide but the teacher's are {}: the cache "
                  "was made with another text encoder",
                  recipe.data_dir, batch.context.size(-1), empty.context.size(2));
            if (empty.pooled.defined() &&
                (!batch.pooled.defined() || batch.pooled.size(-1) != empty.pooled.size(-1)))
              fail(
                  "{}: the cache holds no pooled text embeddings of the teacher's width {} (made "
                  "by an older `lightning cache` or for another model): make it again",
                  recipe.data_dir, empty.pooled.size(-1));
          } else {
            // Latent models train on the VAE's latent means (deterministic, as a cache holds).
            const auto pixels_on_device = batch.pixels.to(device);
            x0 =
                teacher.is_latent()
                    ? teacher.vae->config.to_unet_latent(teacher.vae->encode(pixels_on_device).mean)
                    : pixels_on_device;
            auto embeds = generate::encode_conditioning(teacher, batch.captions);
            context.context = embeds.context;
            context.pooled = embeds.pooled;
          }
          // SDXL: the real crop's original size, top-left and target size (in pixels).
          if (teacher.is_sdxl()) context.time_ids = batch.time_ids.to(device, torch::kFloat32);
        } else {
          const auto index = local(sampler.batch(g, B));
          x0 = pixels.index_select(0, index).to(device);
          const auto label = labels.index_select(0, index);
          const auto tmpl = local(torch::randint(0, templates, {B}, gen, torch::kInt64));
          context.context = caption_context.index_select(
              0, (label * templates + tmpl).to(caption_context.device()));
        }
        const std::vector<int64_t> global_shape = {B, x0.size(1), x0.size(2), x0.size(3)};
        const Conditioning uncond{empty.context, empty.pooled, context.time_ids};
        const auto t =
            grid_tensor
                .index_select(0, local(torch::randint(0, static_cast<int64_t>(grid.size()), {B},
                                                      gen, torch::kInt64)))
                .to(device);
        const auto eps = local(torch::randn(global_shape, gen, torch::kFloat32)).to(device);
        const auto x_t = student_input(schedule, x0, eps, t);
        const auto teacher_denoiser = guided(teacher_fn, context, uncond, stage.teacher_guidance);

        std::map<std::string, double> m;
        if (streamed) m["data_wait_s"] = data_wait_s;
        if (phase.objective == Objective::kX0Warmup) {
          torch::Tensor target_x0;
          {
            torch::NoGradGuard no_grad;
            target_x0 = diffusion::split_model_output(teacher_type, teacher_denoiser(x_t, t), x_t,
                                                      schedule.alpha_bar(t))
                            .x0;
          }
          const auto out_s = student_fn(x_t, t, context);
          const auto x0_s = diffusion::split_model_output(stage.prediction_type, out_s, x_t,
                                                          schedule.alpha_bar(t))
                                .x0;
          mse_update(x0_s, target_x0, m);
        } else {
          torch::Tensor t_prev;
          const auto target = teacher_target(teacher_denoiser, teacher_type, schedule, x_t, t,
                                             stage.n(), stage.teacher_steps, &t_prev);
          torch::Tensor x_prev;
          {
            // A discriminator warm-up needs no gradients through the student.
            std::optional<torch::NoGradGuard> frozen;
            if (!phase.train_generator) frozen.emplace();
            x_prev = student_jump(stage.prediction_type, schedule, student_fn(x_t, t, context), x_t,
                                  t, t_prev);
          }
          if (!adversarial) {
            mse_update(x_prev, target, m);
          } else {
            // What the discriminator sees: x_t' at t', or both re-noised to t* (1-step student).
            torch::Tensor real = target, fake = x_prev, t_d = torch::clamp_min(t_prev, 0);
            if (!stage.renoise_timesteps.empty()) {
              const int64_t done_adv = adversarial_before + (phase.train_generator ? i : 0);
              const bool late =
                  done_adv >= static_cast<int64_t>(stage.renoise_switch * adversarial_total);
              t_d = local(sample_timesteps(
                              stage.renoise_timesteps,
                              late ? stage.renoise_weights_late : stage.renoise_weights, B, gen))
                        .to(device);
              const auto n1 = local(torch::randn(global_shape, gen, torch::kFloat32)).to(device);
              const auto n2 = local(torch::randn(global_shape, gen, torch::kFloat32)).to(device);
              real = diffusion::add_noise(schedule, target, n1, t_d);
              fake = diffusion::add_noise(schedule, x_prev, n2, t_d);
            }
            const bool conditional = phase.objective == Objective::kConditional;
            auto logits = [&](const torch::Tensor& x, const torch::Tensor& f_t) {
              auto f = d_features(x, t_d, context);
              const nn::AutocastScope autocast(bf16 ? nn::AutocastState::bf16()
                                                    : nn::AutocastState::current());
              return (conditional ? disc->conditional(f, f_t) : disc->unconditional(f))
                  .to(torch::kFloat32);
            };
            // Discriminator updates (the last one's losses and outputs are logged).
            torch::Tensor d_loss, real_logits, fake_logits;
            for (int64_t k = 0; k < stage.discriminator_steps; ++k) {
              const auto f_t = conditional ? d_features(x_t, t, context) : torch::Tensor();
              real_logits = logits(real, f_t);
              fake_logits = logits(fake.detach(), f_t);
              d_loss = discriminator_loss(real_logits, fake_logits);
              zero_grads(disc_params);
              d_loss.backward();
              group.average_gradients(disc_params);
              m["grad_norm_d"] = clip(disc_params, recipe.max_grad_norm);
              d_opt.step();
              if (d_shards) d_shards->sync(disc_params, group);
            }
            m["loss_d"] = d_loss.item<double>();
            m["d_real"] = torch::sigmoid(real_logits).mean().item<double>();
            m["d_fake"] = torch::sigmoid(fake_logits).mean().item<double>();
            m["loss_mse"] = torch::mse_loss(x_prev.detach(), target).item<double>();
            if (phase.train_generator) {
              // Student update against the updated discriminator.
              torch::Tensor f_t2;
              if (conditional) {
                torch::NoGradGuard no_grad;
                f_t2 = d_features(x_t, t, context);
              }
              for (auto& q : disc_params)  // the student's update needs no discriminator gradients
                q.set_requires_grad(false);
              const auto g_logits = logits(fake, f_t2);
              auto g_loss = generator_loss(g_logits);
              zero_grads(student_params);
              g_loss.backward();
              for (auto& q : disc_params)
                q.set_requires_grad(true);
              group.average_gradients(student_params);
              m["grad_norm_g"] = clip(student_params, recipe.max_grad_norm);
              g_opt.step();
              if (g_shards) g_shards->sync(student_params, group);
              m["loss_g"] = g_loss.item<double>();
            }
          }
        }
        // The ranks' metrics averaged, and whether any rank was interrupted: every rank takes
        // the same decisions below. Also each rank's compute time (without waiting on others).
        bool interrupted = g_interrupted.load();
        if (group.size() > 1) {
          std::vector<double> v;
          for (const auto& [name, x] : m)
            v.push_back(x);
          v.push_back(interrupted ? 1 : 0);
          v.resize(v.size() + static_cast<size_t>(group.size()), 0.0);
          v[m.size() + 1 + static_cast<size_t>(group.rank())] =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - iteration_start)
                  .count() -
              (group.collective_seconds() - waited_before);
          v = group.sum(v);
          size_t k = 0;
          for (auto& [name, x] : m)
            x = v[k++] / group.size();
          interrupted = v[k++] > 0;
          for (int r = 0; r < group.size(); ++r)
            m[fmt::format("rank{}_compute_s", r)] = v[k++];
        }
        for (const auto& [name, v] : m)
          if (!std::isfinite(v))
            fail(
                "distill: stage {} ({}), phase {}, iteration {}: {} is {}; stopped, the last good "
                "checkpoint is {} (lower the learning rates in {})",
                s + 1, stage.name, phase.name, g + 1, name, v, checkpoint_dir.string(),
                recipe.file);
        if (!ema.empty()) train::ema_update(ema, student_params, stage.ema_decay);
        interval.add(m);
        ++g;
        if (bar)
          bar->update(g,
                      fmt::format("stage {} {} {}", s + 1, phase.name,
                                  !adversarial ? fmt::format("mse {:.4f}", m["loss_mse"])
                                  : phase.train_generator
                                      ? fmt::format("G {:.3f} D {:.3f}", m["loss_g"], m["loss_d"])
                                      : fmt::format("D {:.3f}", m["loss_d"])));

        const bool phase_done = i + 1 == phase.iterations;
        if (phase_done && !ema.empty()) {  // the phase hands on its averages
          torch::NoGradGuard no_grad;
          for (size_t k = 0; k < ema.size(); ++k)
            student_params[k].copy_(ema[k]);
        }
        if (main_rank && (g % recipe.log_every == 0 || phase_done || g == stop)) {
          const auto now = std::chrono::steady_clock::now();
          const double secs = std::chrono::duration<double>(now - interval_start).count();
          interval_start = now;
          nlohmann::json line = {
              {"step", g},
              {"stage", s + 1},
              {"stage_name", stage.name},
              {"phase", phase.name},
              {"iteration", i + 1},
              {"lr", lr},
              {"images_per_s", interval.count * B / std::max(secs, 1e-9)},
              // This process's peak since the phase began: the GPU allocator's, else RSS.
              {"peak_memory_gb", peak_memory_bytes(device) / 1e9},
              {"elapsed_s", elapsed_before + elapsed_s()}};
          if (group.size() > 1) line["ranks"] = group.size();
          if (stream) {  // rank 0's stream (the others' skips are in their logs)
            line["data_epoch"] = prefetcher->state().at("stream").at("epoch");
            line["data_skipped"] = prefetcher->state().at("skipped");
          }
          if (adversarial) line["lr_d"] = stage.discriminator_learning_rate;
          for (const auto& [k, v] : interval.sums)
            line[k] = v / interval.count;
          std::fputs((line.dump() + "\n").c_str(), metrics);
          std::fflush(metrics);
          add_to_curves(line);
          train::write_curves_png(curves, (out / "loss.png").string(),
                                  "distillation losses (all stages)", "loss", true);
          interval = Interval{};
        }
        const bool stage_done = phase_done && p + 1 == phases.size();
        if (g % recipe.sample_every == 0 && !stage_done) write_samples(g);
        if (stage_done) {  // finish the stage before its checkpoint: resuming starts the next one
          // Its training is over: the gradients (a UNet's and a discriminator's worth, 15.5 GB
          // for SDXL in f32) go before the samples and the saved model add their own memory.
          for (auto& q : student->parameters())
            q.mutable_grad() = torch::Tensor();
          if (disc)
            for (auto& q : disc->parameters())
              q.mutable_grad() = torch::Tensor();
          if (lora_attached) save_and_merge_lora();
          write_samples(g);
          student->eval();
          if (main_rank)
            generate::save_model(student_model, (stage_dir / "model").string(), torch::kFloat16);
          result.model_dirs.push_back((stage_dir / "model").string());
          spdlog::info("distill: stage {} ({}) done: {}", s + 1, stage.name,
                       (stage_dir / "model").string());
        }
        if (options.checkpoints &&
            (g % recipe.checkpoint_every == 0 || g == stop || stage_done || interrupted))
          write_checkpoint(g);
        if (interrupted) {
          if (bar) bar->finish();
          if (options.checkpoints)
            spdlog::warn(
                "distill: interrupted at iteration {}; checkpoint written (continue with --resume)",
                g);
          else
            spdlog::warn(
                "distill: interrupted at iteration {} (no checkpoint: checkpoints are off)", g);
          result.interrupted = true;
          result.iterations = g;
          return result;
        }
      }
      if (g >= stop && g < total) {
        group.barrier();  // rank 0's checkpoint is complete before any rank leaves
        if (bar) bar->finish();
        spdlog::info("distill: stopped at iteration {} of {} (continue with --resume)", g, total);
        result.iterations = g;
        return result;
      }
    }
    // The next stage's teacher: this stage's student as saved (what a resumed run loads too;
    // every rank reads rank 0's files, so the run directory is shared by all ranks).
    group.barrier();
    if (s + 1 == recipe.stages.size()) break;
    student = nullptr;  // the stage's networks go before the next teacher comes
    disc = nullptr;
    student_model.unet = nullptr;
    teacher.unet = nullptr;
    teacher = generate::load_model(result.model_dirs.back(), load_options);
    teacher.text_encoder->eval();
    if (options.teacher_loaded) options.teacher_loaded(result.model_dirs.back());
  }
  if (bar) bar->finish();
  result.iterations = g;
  spdlog::info("distill: {} stages done in {}", recipe.stages.size(),
               format_duration(elapsed_before + elapsed_s()));
  return result;
}

}  // namespace lightning::distill
