#include "train/teacher.h"

#include <algorithm>
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
#include "data/fashion_mnist.h"
#include "diffusion/noise_schedule.h"
#include "diffusion/parameterization.h"
#include "io/files.h"
#include "io/image.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/toml.h"
#include "models/model_loader.h"
#include "models/unet.h"
#include "text/clip_tokenizer.h"
#include "train/train_util.h"

namespace lightning::train {
namespace fs = std::filesystem;

namespace {

// The weights type of `save_dtype`; nullopt for an unknown name.
std::optional<torch::ScalarType> save_dtype_of(const std::string& value) {
  if (value == "float32") return torch::kFloat32;
  if (value == "float16") return torch::kFloat16;
  if (value == "bfloat16") return torch::kBFloat16;
  return std::nullopt;
}

nlohmann::json section(io::ConfigReader& root, const std::string& key) {
  auto value = root.get_raw(key);
  if (value.is_null()) return nlohmann::json::object();
  if (!value.is_object()) root.fail_key(key, "expected a table");
  return value;
}

void ema_update(torch::nn::Module& ema, const torch::nn::Module& model, double decay) {
  train::ema_update(ema.parameters(true), model.parameters(true), decay);
}

void copy_weights(torch::nn::Module& dst, const torch::nn::Module& src) {
  torch::NoGradGuard no_grad;
  auto target = dst.parameters(true);
  auto source = src.parameters(true);
  for (size_t i = 0; i < target.size(); ++i)
    target[i].copy_(source[i]);
}

struct MetricPoint {
  int64_t step;
  double loss;
};

void write_loss_plot(const std::vector<MetricPoint>& points, const std::string& path,
                     const std::string& title) {
  Curve loss{"loss", {}, {}};
  for (const auto& p : points) {
    loss.x.push_back(static_cast<double>(p.step));
    loss.y.push_back(p.loss);
  }
  write_curves_png({loss}, path, title, "loss", /*log_y=*/true);
}

}  // namespace

TeacherRecipe TeacherRecipe::from_json(const nlohmann::json& json, const std::string& file) {
  io::ConfigReader root(json, file);
  TeacherRecipe r;
  r.file = file;
  root.expect("task", "teacher");
  {
    io::ConfigReader m(section(root, "model"), file + " [model]");
    r.name = m.get_string("name", fs::path(file).stem().string());
    m.refuse_unknown_keys();
  }
  {
    io::ConfigReader d(section(root, "data"), file + " [data]");
    d.expect("dataset", "fashion-mnist");
    r.data_dir = d.get_string("dir", data::kFashionMnistDir);
    r.hflip = d.get_bool("hflip", r.hflip);
    d.refuse_unknown_keys();
  }
  auto unet = section(root, "unet");
  if (unet.empty()) root.fail_key("unet", "missing: the UNet's diffusers config keys");
  r.unet = models::UNetConfig::from_json(unet, file + " [unet]");
  auto text = section(root, "text_encoder");
  if (text.contains("vocab_size"))
    fail("{} [text_encoder]: vocab_size is set from the tokenizer; remove it", file);
  text["vocab_size"] = 1;  // placeholder until the tokenizer is built
  r.text = models::CLIPTextConfig::from_json(text, file + " [text_encoder]");
  r.text.with_projection = false;
  r.scheduler = diffusion::from_json(section(root, "scheduler"), file + " [scheduler]");
  r.recommended =
      generate::Recommended::from_json(section(root, "recommended"), file + " [recommended]");
  {
    io::ConfigReader t(section(root, "train"), file + " [train]");
    r.seed = static_cast<uint64_t>(t.get_int("seed", 0));
    r.steps = t.get_int("steps", r.steps);
    r.batch_size = t.get_int("batch_size", r.batch_size);
    r.learning_rate = t.get_double("learning_rate", r.learning_rate);
    r.lr_warmup_steps = t.get_int("lr_warmup_steps", r.lr_warmup_steps);
    r.lr_schedule = t.get_string("lr_schedule", r.lr_schedule);
    r.weight_decay = t.get_double("weight_decay", r.weight_decay);
    r.adam_beta1 = t.get_double("adam_beta1", r.adam_beta1);
    r.adam_beta2 = t.get_double("adam_beta2", r.adam_beta2);
    r.adam_epsilon = t.get_double("adam_epsilon", r.adam_epsilon);
    r.max_grad_norm = t.get_double("max_grad_norm", r.max_grad_norm);
    r.ema_decay = t.get_double("ema_decay", r.ema_decay);
    r.caption_dropout = t.get_double("caption_dropout", r.caption_dropout);
    r.snr_gamma = t.get_double("snr_gamma", r.snr_gamma);
    r.save_dtype = t.get_string("save_dtype", r.save_dtype);
    if (!save_dtype_of(r.save_dtype))
      t.fail_key("save_dtype",
                 fmt::format("'{}' is not one of float32, float16, bfloat16", r.save_dtype));
    if (r.steps < 1) t.fail_key("steps", fmt::format("must be >= 1, got {}", r.steps));
    if (r.batch_size < 1)
      t.fail_key("batch_size", fmt::format("must be >= 1, got {}", r.batch_size));
    if (!(r.learning_rate > 0)) t.fail_key("learning_rate", "must be > 0");
    if (r.lr_warmup_steps < 0) t.fail_key("lr_warmup_steps", "must be >= 0");
    if (r.lr_schedule != "constant" && r.lr_schedule != "cosine")
      t.fail_key("lr_schedule", fmt::format("'{}' is not one of constant, cosine", r.lr_schedule));
    if (!(r.ema_decay >= 0 && r.ema_decay < 1)) t.fail_key("ema_decay", "must be in [0, 1)");
    if (!(r.caption_dropout >= 0 && r.caption_dropout <= 1))
      t.fail_key("caption_dropout", "must be in [0, 1]");
    if (!(r.snr_gamma >= 0)) t.fail_key("snr_gamma", "must be >= 0");
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
    r.sample_steps = s.get_int("steps", r.sample_steps);
    r.sample_per_class = s.get_int("per_class", r.sample_per_class);
    r.sample_guidance = s.get_double("guidance_scale", r.sample_guidance);
    r.sample_sampler = diffusion::parse_sampler_kind(s.get_string("sampler", "euler"));
    r.sample_seed = static_cast<uint64_t>(s.get_int("seed", 0));
    if (r.sample_steps < 1) s.fail_key("steps", "must be >= 1");
    if (r.sample_per_class < 1) s.fail_key("per_class", "must be >= 1");
    s.refuse_unknown_keys();
  }
  root.refuse_unknown_keys();
  if (r.unet.in_channels != 1 || r.unet.out_channels != 1)
    fail("{} [unet]: Fashion-MNIST is greyscale: in_channels and out_channels must be 1", file);
  if (r.unet.cross_attention_dim.empty() || r.unet.cross_attention_dim[0] != r.text.hidden_size)
    fail("{}: [unet] cross_attention_dim must equal [text_encoder] hidden_size ({})", file,
         r.text.hidden_size);
  if (!r.unet.addition_embed_type.empty())
    fail("{} [unet]: addition_embed_type is not supported by the teacher trainer", file);
  if (r.unet.sample_size == 0) r.unet.sample_size = 32;
  if (r.unet.sample_size != 32) fail("{} [unet]: sample_size must be 32 (28x28 padded)", file);
  return r;
}

TeacherRecipe TeacherRecipe::load(const std::string& toml_path) {
  return from_json(io::read_toml_file(toml_path), toml_path);
}

std::string train_teacher(const TeacherRecipe& recipe, const TrainOptions& options) {
  const fs::path out(options.out_dir);
  const fs::path checkpoint_dir = out / "checkpoint";
  const fs::path metrics_path = out / "metrics.jsonl";
  const int64_t total_steps = options.steps.value_or(recipe.steps);
  if (total_steps < 1) fail_usage("--steps must be >= 1, got {}", total_steps);
  if (options.resume && !fs::exists(checkpoint_dir / "state.json"))
    fail_usage("--resume: {} has no checkpoint", (checkpoint_dir / "state.json").string());
  if (!options.resume && (fs::exists(checkpoint_dir) || fs::exists(metrics_path)))
    fail_usage(
        "--out {} already holds a training run: pass --resume to continue it or choose "
        "another directory",
        out.string());
  fs::create_directories(out / "samples");
  keep_recipe_copy(recipe.file, out.string());  // the recipe beside the results

  // Data and captions.
  auto dataset = data::load_fashion_mnist(data::Split::kTrain, recipe.data_dir);
  const auto pixels = data::to_model_pixels(dataset.images);  // [N, 1, 32, 32]
  const auto labels = dataset.labels;
  const int64_t n = dataset.size();
  std::vector<std::string> captions;
  const size_t templates = data::caption_templates().size();
  for (int64_t c = 0; c < data::kFashionMnistClasses; ++c) {
    for (size_t t = 0; t < templates; ++t)
      captions.push_back(data::caption(c, t));
    captions.push_back(data::class_prompt(c));
  }
  auto tokenizer = std::make_shared<text::CLIPTokenizer>(
      text::CLIPTokenizer::load(options.vocab).restricted_to(captions));
  auto text_config = recipe.text;
  text_config.vocab_size = static_cast<int64_t>(tokenizer->vocab().size());
  text_config.bos_token_id = tokenizer->bos_id();
  text_config.eos_token_id = tokenizer->eos_id();
  text_config.pad_token_id = tokenizer->eos_id();
  const int64_t context = text_config.max_position_embeddings;
  auto caption_ids = torch::empty(
      {data::kFashionMnistClasses, static_cast<int64_t>(templates), context}, torch::kInt64);
  for (int64_t c = 0; c < data::kFashionMnistClasses; ++c)
    for (size_t t = 0; t < templates; ++t) {
      auto enc = tokenizer->encode_padded(data::caption(c, t), tokenizer->eos_id(), context);
      caption_ids[c][static_cast<int64_t>(t)] = torch::tensor(enc.input_ids, torch::kInt64);
    }
  const auto empty_ids = torch::tensor(
      tokenizer->encode_padded("", tokenizer->eos_id(), context).input_ids, torch::kInt64);
  // Every caption's ids as one table (class-major, then template), the empty caption last.
  const auto caption_table =
      torch::cat({caption_ids.view({-1, context}), empty_ids.view({1, context})});
  const int64_t empty_row = caption_table.size(0) - 1;

  // Models, EMA copies and the optimiser.
  torch::manual_seed(mix_seed(recipe.seed, 0, 0));
  models::UNet2DConditionModel unet(recipe.unet);
  models::CLIPTextModel text_encoder(text_config);
  models::UNet2DConditionModel ema_unet = models::make_unet_uninitialised(recipe.unet);
  models::CLIPTextModel ema_text = models::make_clip_text_uninitialised(text_config);
  copy_weights(*ema_unet, *unet);
  copy_weights(*ema_text, *text_encoder);
  ema_unet->eval();
  ema_text->eval();
  auto params = named_params(*unet, "unet.");
  for (auto& p : named_params(*text_encoder, "text_encoder."))
    params.push_back(p);
  std::vector<torch::Tensor> param_list;
  for (auto& [name, p] : params)
    param_list.push_back(p);
  torch::optim::AdamW optimizer(param_list, torch::optim::AdamWOptions(recipe.learning_rate)
                                                .betas({recipe.adam_beta1, recipe.adam_beta2})
                                                .eps(recipe.adam_epsilon)
                                                .weight_decay(recipe.weight_decay));
  int64_t nparams = 0;
  for (auto& p : param_list)
    nparams += p.numel();
  spdlog::info("train: {} ({:.2f} M parameters: UNet + text encoder), {} images, vocabulary {}",
               recipe.name, nparams / 1e6, n, text_config.vocab_size);

  diffusion::NoiseSchedule schedule(recipe.scheduler);
  const int64_t T = schedule.num_train_timesteps();

  // Resume.
  int64_t start_step = 0;
  double elapsed_before = 0;
  std::vector<MetricPoint> history;
  if (options.resume) {
    auto state = io::read_json_file((checkpoint_dir / "state.json").string());
    start_step = state.at("step").get<int64_t>();
    elapsed_before = state.value("elapsed_s", 0.0);
    for (auto [module, file] : std::vector<std::pair<torch::nn::Module*, const char*>>{
             {unet.get(), "unet.safetensors"},
             {text_encoder.get(), "text_encoder.safetensors"},
             {ema_unet.get(), "ema_unet.safetensors"},
             {ema_text.get(), "ema_text_encoder.safetensors"}})
      load_trainable_weights(*module, (checkpoint_dir / file).string());
    params = named_params(*unet, "unet.");
    for (auto& p : named_params(*text_encoder, "text_encoder."))
      params.push_back(p);
    param_list.clear();
    for (auto& [name, p] : params)
      param_list.push_back(p);
    optimizer.param_groups()[0].params() = param_list;
    restore_adam_state(optimizer, params, (checkpoint_dir / "optimizer.safetensors").string(),
                       start_step, /*adamw=*/true);
    for (const auto& j : truncate_metrics(metrics_path.string(), start_step))
      history.push_back({j["step"].get<int64_t>(), j.value("loss", 0.0)});
    spdlog::info("train: resuming {} at step {}", out.string(), start_step);
  }
  if (start_step >= total_steps)
    spdlog::warn("train: the checkpoint is at step {} already (of {})", start_step, total_steps);

  generate::TextToImageModel sample_model;
  sample_model.unet = ema_unet;
  sample_model.text_encoder = ema_text;
  sample_model.tokenizer = tokenizer;
  sample_model.pad_id = tokenizer->eos_id();
  sample_model.scheduler = recipe.scheduler;
  sample_model.recommended = recipe.recommended;
  sample_model.name = recipe.name;

  auto write_samples = [&](int64_t step) {
    generate::GenerateRequest req;
    for (int64_t c = 0; c < data::kFashionMnistClasses; ++c)
      for (int64_t k = 0; k < recipe.sample_per_class; ++k)
        req.prompts.push_back(data::class_prompt(c));
    req.steps = recipe.sample_steps;
    req.guidance_scale = recipe.sample_guidance;
    req.sampler = recipe.sample_sampler;
    req.seed = recipe.sample_seed;
    auto images = generate::generate(sample_model, req);
    auto grid = io::make_grid(io::to_uint8_image(images), recipe.sample_per_class, 2, 255);
    auto path = out / "samples" / fmt::format("step_{:06d}.png", step);
    io::write_png(path.string(), grid,
                  {{"parameters",
                    fmt::format("rows: the 10 Fashion-MNIST classes ('{}'), {} "
                                "steps, {}, CFG scale {:g}, step {}",
                                data::class_prompt(0), req.steps,
                                diffusion::to_string(*req.sampler), *req.guidance_scale, step)}});
  };

  auto write_checkpoint = [&](int64_t step, double elapsed) {
    io::write_directory_atomic(checkpoint_dir.string(), [&](const std::string& tmp) {
      io::save_weights(*unet, tmp + "/unet.safetensors");
      io::save_weights(*text_encoder, tmp + "/text_encoder.safetensors");
      io::save_weights(*ema_unet, tmp + "/ema_unet.safetensors");
      io::save_weights(*ema_text, tmp + "/ema_text_encoder.safetensors");
      const auto opt = adam_state_tensors(optimizer, params);
      io::save_safetensors(tmp + "/optimizer.safetensors", opt);
      io::write_json_file(tmp + "/state.json", {{"step", step},
                                                {"elapsed_s", elapsed},
                                                {"recipe", recipe.name},
                                                {"total_steps", total_steps}});
    });
  };

  auto lr_at = [&](int64_t step) {  // step is 0-based: the update being made
    double lr = recipe.learning_rate;
    if (step < recipe.lr_warmup_steps)
      return lr * static_cast<double>(step + 1) / recipe.lr_warmup_steps;
    if (recipe.lr_schedule == "cosine") {
      double progress = static_cast<double>(step - recipe.lr_warmup_steps) /
                        std::max<int64_t>(1, total_steps - recipe.lr_warmup_steps);
      lr *= 0.5 * (1 + std::cos(M_PI * std::min(1.0, progress)));
    }
    return lr;
  };

  EpochSampler sampler(n, recipe.seed);
  const auto alphas_cumprod = schedule.alphas_cumprod();
  unet->train();
  text_encoder->train();
  ProgressBar bar("train", total_steps, "step", start_step);
  double interval_loss = 0, interval_grad = 0;
  int64_t interval_count = 0;
  auto interval_start = std::chrono::steady_clock::now();
  std::FILE* metrics = std::fopen(metrics_path.c_str(), "a");
  if (!metrics) fail("{}: cannot open for appending", metrics_path.string());
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> metrics_guard(metrics, &std::fclose);

  const int64_t stop = std::min(total_steps, options.until.value_or(total_steps));
  for (int64_t step = start_step; step < stop; ++step) {
    const auto index = sampler.batch(step, recipe.batch_size);
    auto gen = torch_generator(mix_seed(recipe.seed, 2, static_cast<uint64_t>(step)));
    std::mt19937_64 rng(mix_seed(recipe.seed, 3, static_cast<uint64_t>(step)));
    auto x0 = pixels.index_select(0, index);
    if (recipe.hflip) {
      auto flip = torch::rand({recipe.batch_size}, gen) < 0.5;
      x0 = torch::where(flip.view({-1, 1, 1, 1}), x0.flip({3}), x0);
    }
    const auto batch_labels = labels.index_select(0, index);
    const auto* label = batch_labels.data_ptr<int64_t>();
    auto rows = torch::empty({recipe.batch_size}, torch::kInt64);  // rows of caption_table
    auto* row = rows.data_ptr<int64_t>();
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    std::uniform_int_distribution<int64_t> pick(0, static_cast<int64_t>(templates) - 1);
    for (int64_t i = 0; i < recipe.batch_size; ++i) {
      bool drop = uniform(rng) < recipe.caption_dropout;
      int64_t t = pick(rng);
      row[i] = drop ? empty_row : label[i] * static_cast<int64_t>(templates) + t;
    }
    const auto ids = caption_table.index_select(0, rows);
    auto t = torch::randint(0, T, {recipe.batch_size}, gen, torch::kInt64);
    auto eps = torch::randn(x0.sizes(), gen, torch::kFloat32);
    auto ab = alphas_cumprod.index_select(0, t);
    auto xt = diffusion::add_noise(x0, eps, ab);

    auto hidden = text_encoder->forward(ids).last_hidden_state;
    models::UNetInputs inputs;
    inputs.sample = xt;
    inputs.timestep = t;
    inputs.encoder_hidden_states = hidden;
    auto pred = unet->forward(inputs);
    auto target = diffusion::model_target(recipe.scheduler.prediction_type, x0, eps, ab);
    auto per_sample = (pred - target).pow(2).mean({1, 2, 3});
    torch::Tensor loss;
    if (recipe.snr_gamma > 0) {
      auto snr = ab / (1 - ab);
      auto clipped = torch::clamp_max(snr, recipe.snr_gamma);
      torch::Tensor w;
      switch (recipe.scheduler.prediction_type) {
        case diffusion::PredictionType::kEpsilon:
          w = clipped / snr;
          break;
        case diffusion::PredictionType::kVPrediction:
          w = clipped / (snr + 1);
          break;
        case diffusion::PredictionType::kSample:
          w = clipped;
          break;
      }
      loss = (per_sample * w).mean();
    } else {
      loss = per_sample.mean();
    }
    optimizer.zero_grad();
    loss.backward();
    double grad_norm = recipe.max_grad_norm > 0
                           ? torch::nn::utils::clip_grad_norm_(param_list, recipe.max_grad_norm)
                           : 0.0;
    double lr = lr_at(step);
    for (auto& group : optimizer.param_groups())
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    optimizer.step();
    if (recipe.ema_decay > 0) {
      const double decay = ema_decay_at(recipe.ema_decay, step);
      ema_update(*ema_unet, *unet, decay);
      ema_update(*ema_text, *text_encoder, decay);
    } else {
      copy_weights(*ema_unet, *unet);
      copy_weights(*ema_text, *text_encoder);
    }

    const double loss_value = loss.item<double>();
    if (!std::isfinite(loss_value))
      fail("train: the loss is {} at step {} (lower learning_rate in {})", loss_value, step + 1,
           recipe.file);
    interval_loss += loss_value;
    interval_grad += grad_norm;
    ++interval_count;
    const int64_t done = step + 1;
    bar.update(done, fmt::format("loss {:.4f} lr {:.2e}", loss_value, lr));
    if (done % recipe.log_every == 0 || done == total_steps) {
      auto now = std::chrono::steady_clock::now();
      double secs = std::chrono::duration<double>(now - interval_start).count();
      interval_start = now;
      double mean_loss = interval_loss / interval_count;
      nlohmann::json line = {{"step", done},
                             {"epoch", static_cast<double>(done * recipe.batch_size) / n},
                             {"loss", mean_loss},
                             {"grad_norm", interval_grad / interval_count},
                             {"lr", lr},
                             {"images_per_s", interval_count * recipe.batch_size / secs},
                             {"elapsed_s", elapsed_before + bar.elapsed_s()}};
      std::fputs((line.dump() + "\n").c_str(), metrics);
      std::fflush(metrics);
      history.push_back({done, mean_loss});
      write_loss_plot(history, (out / "loss.png").string(), recipe.name + " training loss");
      interval_loss = interval_grad = 0;
      interval_count = 0;
    }
    if (done % recipe.sample_every == 0 || done == total_steps) write_samples(done);
    if (done % recipe.checkpoint_every == 0 || done == total_steps || done == stop)
      write_checkpoint(done, elapsed_before + bar.elapsed_s());
  }
  bar.finish();
  if (stop < total_steps) {
    spdlog::info("train: stopped at step {} of {} (continue with --resume)", stop, total_steps);
    return "";
  }

  // The model: EMA weights, the restricted tokenizer, the scheduler and recommendations.
  const auto dtype = *save_dtype_of(recipe.save_dtype);  // checked when the recipe was read
  const auto model_dir = (out / "model").string();
  generate::save_model(
      sample_model, model_dir,
      dtype == torch::kFloat32 ? c10::nullopt : c10::optional<torch::ScalarType>(dtype));
  spdlog::info("train: saved {} ({} steps, {} of training)", model_dir, total_steps,
               format_duration(elapsed_before + bar.elapsed_s()));
  return model_dir;
}

}  // namespace lightning::train
