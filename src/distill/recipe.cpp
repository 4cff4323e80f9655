#include "distill/recipe.h"

#include <fmt/format.h>
#include <algorithm>

#include "core/error.h"
#include "data/fashion_mnist.h"
#include "io/json_config.h"
#include "io/toml.h"
#include "train/train_util.h"

namespace lightning::distill {
namespace {

nlohmann::json section(io::ConfigReader& root, const std::string& key) {
  auto value = root.get_raw(key);
  if (value.is_null()) return nlohmann::json::object();
  if (!value.is_object()) root.fail_key(key, "expected a table");
  return value;
}

std::vector<double> get_double_list(io::ConfigReader& r, const std::string& key) {
  auto value = r.get_raw(key);
  if (value.is_null()) return {};
  if (!value.is_array()) r.fail_key(key, "expected a list of numbers");
  std::vector<double> out;
  for (const auto& v : value) {
    if (!v.is_number()) r.fail_key(key, "expected a list of numbers");
    out.push_back(v.get<double>());
  }
  return out;
}

std::vector<int64_t> get_int_list(io::ConfigReader& r, const std::string& key) {
  auto value = r.get_raw(key);
  if (value.is_null()) return {};
  if (!value.is_array()) r.fail_key(key, "expected a list of integers");
  std::vector<int64_t> out;
  for (const auto& v : value) {
    if (!v.is_number_integer()) r.fail_key(key, "expected a list of integers");
    out.push_back(v.get<int64_t>());
  }
  return out;
}

// Two numbers, e.g. adam_betas = [0.9, 0.999].
void get_pair(io::ConfigReader& r, const std::string& key, double& first, double& second) {
  auto values = get_double_list(r, key);
  if (values.empty()) return;
  if (values.size() != 2) r.fail_key(key, "expected two numbers, e.g. [0.9, 0.999]");
  for (double v : values)
    if (!(v >= 0 && v < 1)) r.fail_key(key, fmt::format("{} is outside [0, 1)", v));
  first = values[0];
  second = values[1];
}

StageRecipe read_stage(const nlohmann::json& json, const std::string& where) {
  if (!json.is_object()) fail("{}: expected a table", where);
  io::ConfigReader r(json, where);
  StageRecipe s;
  s.teacher_steps = r.require_int("teacher_steps");
  s.student_steps = r.require_int("student_steps");
  if (s.teacher_steps < 1) r.fail_key("teacher_steps", "must be >= 1");
  if (s.student_steps < 1) r.fail_key("student_steps", "must be >= 1");
  if (s.teacher_steps % s.student_steps != 0 || s.student_steps >= s.teacher_steps)
    r.fail_key("student_steps",
               fmt::format("{} student steps do not divide {} teacher steps into fewer",
                           s.student_steps, s.teacher_steps));
  s.name = r.get_string("name", fmt::format("{}-to-{}", s.teacher_steps, s.student_steps));
  s.loss = r.get_string("loss", s.loss);
  if (s.loss != "mse" && s.loss != "adversarial")
    r.fail_key("loss", fmt::format("'{}' is not one of mse, adversarial", s.loss));
  s.teacher_guidance = r.get_double("teacher_guidance", s.teacher_guidance);
  if (!(s.teacher_guidance >= 0)) r.fail_key("teacher_guidance", "must be >= 0");
  s.prediction_type = diffusion::parse_prediction_type(r.get_string("prediction_type", "epsilon"),
                                                       where + " prediction_type");
  s.timesteps = get_int_list(r, "timesteps");

  s.x0_warmup_iterations = r.get_int("x0_warmup_iterations", 0);
  s.mse_iterations = r.get_int("mse_iterations", 0);
  s.conditional_iterations = r.get_int("conditional_iterations", 0);
  s.unconditional_iterations = r.get_int("unconditional_iterations", 0);
  s.full_iterations = r.get_int("full_iterations", 0);
  s.discriminator_warmup_iterations = r.get_int("discriminator_warmup_iterations", 0);
  for (const char* key :
       {"x0_warmup_iterations", "mse_iterations", "conditional_iterations",
        "unconditional_iterations", "full_iterations", "discriminator_warmup_iterations"})
    if (r.get_int(key, 0) < 0) r.fail_key(key, "must be >= 0");
  if (s.loss == "mse") {
    if (s.mse_iterations < 1) r.fail_key("mse_iterations", "an mse stage needs >= 1");
    if (s.conditional_iterations || s.unconditional_iterations)
      r.fail_key(s.conditional_iterations ? "conditional_iterations" : "unconditional_iterations",
                 "only adversarial stages have discriminator phases");
    if (s.discriminator_warmup_iterations)
      r.fail_key("discriminator_warmup_iterations", "an mse stage has no discriminator");
  } else {
    if (s.mse_iterations) r.fail_key("mse_iterations", "an adversarial stage has no mse phase");
    if (s.conditional_iterations + s.unconditional_iterations < 1)
      r.fail_key("conditional_iterations",
                 "an adversarial stage needs conditional and/or unconditional iterations");
  }
  if (s.x0_warmup_iterations && s.prediction_type != diffusion::PredictionType::kSample)
    r.fail_key("x0_warmup_iterations", "only for a student with prediction_type = \"sample\"");

  s.learning_rate = r.get_double("learning_rate", s.loss == "mse" ? 1e-5 : 1e-6);
  s.full_learning_rate = r.get_double("full_learning_rate", 0);
  s.x0_warmup_learning_rate = r.get_double("x0_warmup_learning_rate", 0);
  if (!(s.x0_warmup_learning_rate >= 0)) r.fail_key("x0_warmup_learning_rate", "must be >= 0");
  if (s.loss == "adversarial") s.adam_beta1 = 0.0, s.adam_beta2 = 0.99;
  get_pair(r, "adam_betas", s.adam_beta1, s.adam_beta2);
  s.ema_decay = r.get_double("ema_decay", s.ema_decay);
  if (!(s.ema_decay >= 0 && s.ema_decay < 1))
    r.fail_key("ema_decay", fmt::format("{} is outside [0, 1) (0: no average)", s.ema_decay));
  s.discriminator_learning_rate = r.get_double("discriminator_learning_rate", s.learning_rate);
  get_pair(r, "discriminator_adam_betas", s.discriminator_beta1, s.discriminator_beta2);
  s.discriminator_steps = r.get_int("discriminator_steps", s.discriminator_steps);
  if (s.discriminator_steps < 1) r.fail_key("discriminator_steps", "must be >= 1");
  if (!(s.learning_rate > 0)) r.fail_key("learning_rate", "must be > 0");
  if (!(s.full_learning_rate >= 0)) r.fail_key("full_learning_rate", "must be >= 0");
  if (!(s.discriminator_learning_rate > 0))
    r.fail_key("discriminator_learning_rate", "must be > 0");
  s.head.channels = r.get_int("head_channels", 0);
  s.head.blocks = r.get_int("head_blocks", s.head.blocks);
  s.head.norm_groups = r.get_int("head_norm_groups", s.head.norm_groups);
  if (s.head.channels < 0) r.fail_key("head_channels", "must be >= 0 (0: the backbone's width)");
  if (s.head.blocks < 0) r.fail_key("head_blocks", "must be >= 0");
  if (s.head.norm_groups < 1) r.fail_key("head_norm_groups", "must be >= 1");

  s.lora_rank = r.get_int("lora_rank", 0);
  if (r.has("lora_rank") && s.lora_rank < 1)
    r.fail_key(
        "lora_rank",
        fmt::format("must be >= 1, got {} (leave it out to train the full UNet)", s.lora_rank));
  if (s.lora_rank == 0 && r.has("lora_alpha"))
    r.fail_key("lora_alpha", "set without a LoRA (lora_rank = 0)");
  s.lora_alpha = r.get_double("lora_alpha", static_cast<double>(s.lora_rank));
  if (s.lora_rank > 0 && !(s.lora_alpha > 0)) r.fail_key("lora_alpha", "must be > 0");
  if (s.full_iterations && s.lora_rank == 0)
    r.fail_key("full_iterations",
               "only for LoRA stages (the LoRA is merged, then the full UNet trains)");

  s.renoise_timesteps = get_int_list(r, "renoise_timesteps");
  s.renoise_weights = get_double_list(r, "renoise_weights");
  s.renoise_weights_late = get_double_list(r, "renoise_weights_late");
  s.renoise_switch = r.get_double("renoise_switch", s.renoise_switch);
  if (!s.renoise_timesteps.empty()) {
    if (s.renoise_weights.empty()) s.renoise_weights.assign(s.renoise_timesteps.size(), 1.0);
    if (s.renoise_weights_late.empty()) s.renoise_weights_late = s.renoise_weights;
    if (s.renoise_weights.size() != s.renoise_timesteps.size())
      r.fail_key("renoise_weights", "needs one weight per renoise_timesteps entry");
    if (s.renoise_weights_late.size() != s.renoise_timesteps.size())
      r.fail_key("renoise_weights_late", "needs one weight per renoise_timesteps entry");
    if (!(s.renoise_switch >= 0 && s.renoise_switch <= 1))
      r.fail_key("renoise_switch", "must be in [0, 1]");
  } else if (!s.renoise_weights.empty() || !s.renoise_weights_late.empty()) {
    r.fail_key("renoise_weights", "set without renoise_timesteps");
  }
  r.refuse_unknown_keys();
  return s;
}

}  // namespace

std::string to_string(Objective objective) {
  switch (objective) {
    case Objective::kX0Warmup:
      return "x0_warmup";
    case Objective::kMse:
      return "mse";
    case Objective::kConditional:
      return "conditional";
    case Objective::kUnconditional:
      return "unconditional";
  }
  return "?";
}

bool StageRecipe::has_adversarial_phase() const {
  const auto all = phases();
  return std::any_of(all.begin(), all.end(), [](const Phase& p) { return p.adversarial(); });
}

std::vector<Phase> StageRecipe::phases() const {
  const bool use_lora = lora_rank > 0;
  std::vector<Phase> out;
  auto add = [&](const char* name, Objective o, int64_t iterations, bool lora,
                 bool train_generator = true) {
    if (iterations > 0) out.push_back({name, o, iterations, lora, train_generator});
  };
  // A discriminator warm-up only where a phase with a fresh head follows.
  const int64_t d_warmup = discriminator_warmup_iterations;
  add("x0_warmup", Objective::kX0Warmup, x0_warmup_iterations, use_lora);
  add("mse", Objective::kMse, mse_iterations, use_lora);
  add("conditional_d_warmup", Objective::kConditional, conditional_iterations ? d_warmup : 0,
      use_lora, false);
  add("conditional", Objective::kConditional, conditional_iterations, use_lora);
  add("unconditional_d_warmup", Objective::kUnconditional, unconditional_iterations ? d_warmup : 0,
      use_lora, false);
  add("unconditional", Objective::kUnconditional, unconditional_iterations, use_lora);
  add("full", Objective::kUnconditional, full_iterations, false);
  return out;
}

int64_t StageRecipe::total_iterations() const {
  int64_t n = 0;
  for (const auto& p : phases())
    n += p.iterations;
  return n;
}

DistillRecipe DistillRecipe::from_json(const nlohmann::json& json, const std::string& file) {
  io::ConfigReader root(json, file);
  DistillRecipe r;
  r.file = file;
  root.expect("task", "distill");
  {
    io::ConfigReader t(section(root, "teacher"), file + " [teacher]");
    r.teacher = t.require_string("model");
    t.refuse_unknown_keys();
  }
  {
    io::ConfigReader d(section(root, "data"), file + " [data]");
    r.dataset = d.get_string("dataset", r.dataset);
    if (r.dataset == "fashion-mnist") {
      r.data_dir = d.get_string("dir", data::kFashionMnistDir);
    } else if (r.dataset == "webdataset" || r.dataset == "image-folder") {
      if (r.dataset == "webdataset")
        r.source.shards = d.require_string("shards");
      else
        r.source.image_folder = d.require_string("dir");
      r.source.shuffle_buffer = d.get_int("shuffle_buffer", r.source.shuffle_buffer);
      r.source.folder_shard_size = d.get_int("folder_shard_size", r.source.folder_shard_size);
      r.resolution = d.get_int("resolution", 0);
      r.max_aspect = d.get_double("max_aspect", r.max_aspect);
      r.bucket_step = d.get_int("bucket_step", r.bucket_step);
      r.random_crop = d.get_bool("random_crop", r.random_crop);
      if (r.source.folder_shard_size < 1) d.fail_key("folder_shard_size", "must be >= 1");
      if (r.resolution < 0) d.fail_key("resolution", "must be >= 0 (0: the model's size)");
      if (!(r.max_aspect >= 1)) d.fail_key("max_aspect", "must be >= 1 (1: square crops only)");
      if (r.bucket_step < 0) d.fail_key("bucket_step", "must be >= 0 (0: automatic)");
    } else if (r.dataset == "cache") {
      r.data_dir = d.require_string("dir");
      r.source.shuffle_buffer = d.get_int("shuffle_buffer", r.source.shuffle_buffer);
    } else {
      d.fail_key("dataset",
                 fmt::format("'{}' is not one of fashion-mnist, webdataset, image-folder, cache",
                             r.dataset));
    }
    if (r.dataset != "fashion-mnist") {
      r.prefetch = d.get_int("prefetch", r.prefetch);
      if (r.prefetch < 0 || r.prefetch > 64)
        d.fail_key("prefetch", "must be 0 (no read-ahead) to 64 batches");
    }
    d.refuse_unknown_keys();
  }
  {
    io::ConfigReader t(section(root, "train"), file + " [train]");
    r.seed = static_cast<uint64_t>(t.get_int("seed", 0));
    r.batch_size = t.get_int("batch_size", r.batch_size);
    r.max_grad_norm = t.get_double("max_grad_norm", r.max_grad_norm);
    r.gradient_checkpointing = t.get_bool("gradient_checkpointing", r.gradient_checkpointing);
    r.shard_optimizer = t.get_bool("shard_optimizer", r.shard_optimizer);
    r.mixed_precision = t.get_string("mixed_precision", r.mixed_precision);
    if (r.mixed_precision != "no" && r.mixed_precision != "bf16")
      t.fail_key("mixed_precision",
                 fmt::format("'{}' is not one of no, bf16 (fp16 would need loss scaling)",
                             r.mixed_precision));
    r.frozen_weights_dtype = t.get_string("frozen_weights_dtype", r.frozen_weights_dtype);
    if (r.frozen_weights_dtype != "f32" && r.frozen_weights_dtype != "f16" &&
        r.frozen_weights_dtype != "bf16")
      t.fail_key("frozen_weights_dtype",
                 fmt::format("'{}' is not one of f32, f16, bf16", r.frozen_weights_dtype));
    if (r.batch_size < 1)
      t.fail_key("batch_size", fmt::format("must be >= 1, got {}", r.batch_size));
    t.refuse_unknown_keys();
  }
  {
    const auto log = train::read_log_section(section(root, "log"), file + " [log]",
                                             {r.log_every, r.sample_every, r.checkpoint_every});
    r.log_every = log.log_every;
    r.sample_every = log.sample_every;
    r.checkpoint_every = log.checkpoint_every;
  }
  {
    io::ConfigReader s(section(root, "sample"), file + " [sample]");
    r.sample_per_class = s.get_int("per_class", r.sample_per_class);
    r.sample_seed = static_cast<uint64_t>(s.get_int("seed", 0));
    if (r.sample_per_class < 1) s.fail_key("per_class", "must be >= 1");
    if (!s.get_raw("prompts").is_null()) r.sample_prompts = s.require_string_list("prompts");
    s.refuse_unknown_keys();
  }
  r.source.seed = r.seed;
  auto stages = root.get_raw("stages");
  if (!stages.is_array() || stages.empty())
    root.fail_key("stages", "missing: one [[stages]] table per stage");
  for (size_t i = 0; i < stages.size(); ++i) {
    auto stage = read_stage(stages[i], fmt::format("{} [[stages]] #{}", file, i + 1));
    if (i > 0 && stage.teacher_steps != r.stages.back().student_steps)
      fail(
          "{} [[stages]] #{}: teacher_steps = {} but the previous stage's student (its teacher) "
          "samples in {} steps",
          file, i + 1, stage.teacher_steps, r.stages.back().student_steps);
    r.stages.push_back(std::move(stage));
  }
  root.refuse_unknown_keys();
  return r;
}

DistillRecipe DistillRecipe::load(const std::string& toml_path) {
  return from_json(io::read_toml_file(toml_path), toml_path);
}

std::optional<c10::ScalarType> DistillRecipe::frozen_dtype() const {
  if (frozen_weights_dtype == "f16") return c10::kHalf;
  if (frozen_weights_dtype == "bf16") return c10::kBFloat16;
  return std::nullopt;
}

int64_t DistillRecipe::total_iterations() const {
  int64_t n = 0;
  for (const auto& s : stages)
    n += s.total_iterations();
  return n;
}

}  // namespace lightning::distill
