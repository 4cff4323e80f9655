#include "distill/stage.h"

#include <cmath>

#include <fmt/format.h>
#include <torch/torch.h>

#include "diffusion/parameterization.h"
#include "dist/group.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/lora.h"
#include "nn/autocast.h"

namespace lightning::distill {
namespace fs = std::filesystem;

namespace {

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

std::vector<torch::Tensor> values(const NamedTensors& named) {
  std::vector<torch::Tensor> out;
  for (const auto& [name, t] : named)
    out.push_back(t);
  return out;
}

// Summed on the parameters' device in float64, in parameter order, and read back once (on a
// GPU a read per parameter would wait for it some 1,700 times per SDXL update).
double total_norm(const std::vector<torch::Tensor>& params) {
  torch::Tensor sum;
  for (const auto& p : params)
    if (p.grad().defined()) {
      auto s = p.grad().to(torch::kFloat64).square().sum();
      sum = sum.defined() ? sum + s : s;
    }
  return sum.defined() ? std::sqrt(sum.item<double>()) : 0.0;
}

// Clips the gradients to `max_norm` (when > 0); returns their norm before clipping.
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

// One optimiser update from `loss`: gradients (zeroed first) averaged over the ranks and clipped,
// the step (of this rank's share, when sharded, which then goes to the others). Returns the
// gradients' norm before clipping.
double update(const torch::Tensor& loss, const std::vector<torch::Tensor>& params,
              torch::optim::Optimizer& optimizer,
              const std::optional<train::OptimizerShards>& shards, const dist::Group& group,
              double max_norm) {
  zero_grads(params);
  loss.backward();
  group.average_gradients(params);
  const double norm = clip(params, max_norm);
  optimizer.step();
  if (shards) shards->sync(params, group);
  return norm;
}

void drop_grads(torch::nn::Module& module) {
  for (auto& p : module.parameters())
    p.mutable_grad() = torch::Tensor();
}

std::unique_ptr<torch::optim::Adam> make_adam(const NamedTensors& params, double lr, double beta1,
                                              double beta2) {
  return std::make_unique<torch::optim::Adam>(
      values(params), torch::optim::AdamOptions(lr).betas({beta1, beta2}).eps(1e-8));
}

// Adapters train in float32 whatever the dtype of the frozen weights below them.
models::LoRAConfig lora_config(const StageRecipe& stage) {
  return {stage.lora_rank, stage.lora_alpha, models::LoRAConfig{}.exclude, torch::kFloat32};
}

}  // namespace

// ---- StageNetworks

StageNetworks::StageNetworks(const DistillRecipe& recipe, size_t stage, size_t first_phase,
                             generate::TextToImageModel& teacher, const torch::Device& device)
    : recipe_(recipe),
      stage_(recipe.stages[stage]),
      stage_index_(stage),
      teacher_(teacher),
      bf16_(recipe.mixed_precision == "bf16") {
  teacher_.unet->eval();
  for (auto& p : teacher_.unet->parameters())
    p.set_requires_grad(false);
  shares_teacher_ = stage_.phases()[first_phase].lora;
  if (shares_teacher_) {
    student_ = train::unet_sharing_weights(teacher_.unet);
  } else {
    // Its own copy, in float32 also where the teacher is held narrower (frozen_weights_dtype).
    student_ = train::unet_sharing_weights(teacher_.unet);
    train::own_weights(*student_, torch::kFloat32);
    for (auto& p : student_->parameters())
      p.set_requires_grad(true);
  }
  student_->gradient_checkpointing = recipe.gradient_checkpointing;
  student_->train();
  // The discriminator, in stages with adversarial phases only (for SDXL 1.3 B parameters that
  // an MSE stage need not hold).
  torch::manual_seed(train::mix_seed(recipe.seed, 11, stage));
  if (stage_.has_adversarial_phase()) {
    disc_ = models::Discriminator(teacher_.unet->config, stage_.head);
    disc_->init_backbone_from(teacher_.unet);
    disc_->backbone->gradient_checkpointing = recipe.gradient_checkpointing;
    disc_->to(device);
    disc_->train();
  }
}

void StageNetworks::load_checkpoint(const fs::path& dir, const torch::Device& device) {
  // A sharing student's base weights are the teacher's (frozen since the stage began).
  if (!shares_teacher_)
    train::load_trainable_weights(*student_, (dir / "student.safetensors").string(), device);
  if (disc_)
    train::load_trainable_weights(*disc_, (dir / "discriminator.safetensors").string(), device);
  if (fs::exists(dir / "lora.safetensors")) {
    models::attach_lora(*student_, lora_config(stage_));
    io::SafetensorsFile file((dir / "lora.safetensors").string());
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : models::lora_parameters(*student_))
      t.copy_(file.get(name));
    lora_attached_ = true;
  }
}

void StageNetworks::begin_phase(const Phase& phase) {
  if (phase.lora) {  // the base weights are frozen under a LoRA
    for (auto& p : student_->parameters())
      p.set_requires_grad(false);
    if (!lora_attached_) {
      torch::manual_seed(train::mix_seed(recipe_.seed, 10, stage_index_));
      models::attach_lora(*student_, lora_config(stage_));
      lora_attached_ = true;
    }
  } else if (lora_attached_) {  // the full phase: keep the LoRA, merge it, train everything
    merge_lora();
    for (auto& p : student_->parameters())
      p.set_requires_grad(true);
  }
}

void StageNetworks::end_training() {
  drop_grads(*student_);
  disc_ = models::Discriminator(nullptr);  // nothing after training uses it
  if (lora_attached_) merge_lora();
}

void StageNetworks::save_lora(const std::string& kohya_path) {
  fs::create_directories(fs::path(kohya_path).parent_path());
  models::save_kohya_lora(*student_, kohya_path, "lora_unet_", c10::nullopt,
                          {{"ss_network_dim", std::to_string(stage_.lora_rank)},
                           {"ss_network_alpha", fmt::format("{:g}", stage_.lora_alpha)},
                           {"lightning_stage", stage_.name}});
}

void StageNetworks::merge_lora() {
  // From here the student's weights diverge from the teacher's: its own, in float32, before the
  // LoRA is merged into them.
  if (shares_teacher_) {
    train::own_weights(*student_, torch::kFloat32);
    shares_teacher_ = false;
  }
  models::merge_lora(*student_);
  lora_attached_ = false;
}

NamedTensors StageNetworks::student_parameters(const Phase& phase) {
  return phase.lora ? models::lora_parameters(*student_) : train::named_params(*student_, "");
}

NamedTensors StageNetworks::discriminator_parameters() {
  return disc_ ? train::named_params(*disc_, "") : NamedTensors{};
}

void StageNetworks::save_checkpoint(const std::string& dir) {
  // Base weights (adapters are not part of the state dict) and adapters separately.
  io::save_weights(*student_, dir + "/student.safetensors");
  if (disc_) io::save_weights(*disc_, dir + "/discriminator.safetensors");
  if (lora_attached_) {
    NamedTensors lora;
    for (auto& [name, t] : models::lora_parameters(*student_))
      lora.emplace_back(name, t.detach());
    io::save_safetensors(dir + "/lora.safetensors", lora);
  }
}

generate::TextToImageModel StageNetworks::student_model() const {
  generate::TextToImageModel model = teacher_;
  model.unet = student_;
  model.scheduler.prediction_type = stage_.prediction_type;
  model.scheduler.timestep_spacing = diffusion::TimestepSpacing::kTrailing;
  model.recommended = {stage_.student_steps, 1.0, diffusion::SamplerKind::kEuler};
  model.name = stage_.name;
  return model;
}

torch::Tensor StageNetworks::student_output(const torch::Tensor& x, const torch::Tensor& t,
                                            const Conditioning& c) {
  const nn::AutocastScope autocast(nn::AutocastState::bf16_or_current(bf16_));
  return student_->forward(unet_inputs(x, t, c)).to(torch::kFloat32);
}

ConditionedModel StageNetworks::teacher_model() {
  return [this](const torch::Tensor& x, const torch::Tensor& t, const Conditioning& c) {
    const nn::AutocastScope autocast(nn::AutocastState::bf16_or_current(bf16_));
    return teacher_.unet->forward(unet_inputs(x, t, c)).to(torch::kFloat32);
  };
}

torch::Tensor StageNetworks::discriminator_features(const torch::Tensor& x, const torch::Tensor& t,
                                                    const Conditioning& c) {
  const nn::AutocastScope autocast(nn::AutocastState::bf16_or_current(bf16_));
  return disc_->features(unet_inputs(x, t, c));
}

torch::Tensor StageNetworks::discriminator_logits(const torch::Tensor& x, const torch::Tensor& t,
                                                  const Conditioning& c,
                                                  const torch::Tensor& features_t,
                                                  bool conditional) {
  auto f = discriminator_features(x, t, c);
  const nn::AutocastScope autocast(nn::AutocastState::bf16_or_current(bf16_));
  return (conditional ? disc_->conditional(f, features_t) : disc_->unconditional(f))
      .to(torch::kFloat32);
}

// ---- PhaseTrainer

PhaseTrainer::PhaseTrainer(const DistillRecipe& recipe, size_t stage, size_t phase,
                           StageNetworks& networks, const diffusion::NoiseSchedule& schedule,
                           const dist::Group& group, const RankRows& rows,
                           const fs::path& checkpoint_dir, int64_t resume_at)
    : recipe_(recipe),
      stage_(recipe.stages[stage]),
      phase_(stage_.phases()[phase]),
      nets_(networks),
      schedule_(schedule),
      group_(group),
      rows_(rows) {
  grid_ = stage_.timesteps.empty()
              ? diffusion::trailing_timesteps(schedule.num_train_timesteps(), stage_.student_steps)
              : stage_.timesteps;
  grid_tensor_ = torch::tensor(grid_, torch::kInt64);
  const auto phases = stage_.phases();
  adversarial_total_ =
      stage_.conditional_iterations + stage_.unconditional_iterations + stage_.full_iterations;
  for (size_t q = 0; q < phase; ++q)
    if (phases[q].adversarial() && phases[q].train_generator)
      adversarial_before_ += phases[q].iterations;

  student_named_ = nets_.student_parameters(phase_);
  student_params_ = values(student_named_);
  disc_named_ = nets_.discriminator_parameters();
  disc_params_ = values(disc_named_);
  {  // identical starting points on every rank (they are already, by construction)
    auto all = student_params_;
    all.insert(all.end(), disc_params_.begin(), disc_params_.end());
    group_.broadcast(all);
  }
  lr_ = stage_.learning_rate;
  if (phase_.name == "full" && stage_.full_learning_rate > 0) lr_ = stage_.full_learning_rate;
  if (phase_.objective == Objective::kX0Warmup && stage_.x0_warmup_learning_rate > 0)
    lr_ = stage_.x0_warmup_learning_rate;
  // Optimiser state for all parameters, or (sharded) for this rank's share of them.
  if (recipe.shard_optimizer && group.size() > 1) {
    g_shards_.emplace(student_params_, group.size());
    d_shards_.emplace(disc_params_, group.size());
  }
  g_opt_named_ = g_shards_ ? g_shards_->mine(student_named_, group.rank()) : student_named_;
  d_opt_named_ = d_shards_ ? d_shards_->mine(disc_named_, group.rank()) : disc_named_;
  g_opt_ = make_adam(g_opt_named_, lr_, stage_.adam_beta1, stage_.adam_beta2);
  d_opt_ = make_adam(d_opt_named_, stage_.discriminator_learning_rate, stage_.discriminator_beta1,
                     stage_.discriminator_beta2);
  if (resume_at > 0) {
    train::restore_adam_state(*g_opt_, g_opt_named_,
                              (checkpoint_dir / "student_optimizer.safetensors").string(),
                              resume_at, false);
    if (phase_.adversarial())
      train::restore_adam_state(*d_opt_, d_opt_named_,
                                (checkpoint_dir / "discriminator_optimizer.safetensors").string(),
                                resume_at * stage_.discriminator_steps, false);
  }
  // The student's averaged parameters (ema_decay > 0).
  if (stage_.ema_decay > 0 && phase_.train_generator) {
    std::optional<io::SafetensorsFile> saved;
    if (resume_at > 0) saved.emplace((checkpoint_dir / "student_ema.safetensors").string());
    for (const auto& [name, t] : student_named_)
      average_.push_back(saved ? saved->get(name).to(t.device()).clone() : t.detach().clone());
  }
}

void PhaseTrainer::update_student(const torch::Tensor& loss, std::map<std::string, double>& m) {
  m["grad_norm_g"] =
      update(loss, student_params_, *g_opt_, g_shards_, group_, recipe_.max_grad_norm);
}

std::map<std::string, double> PhaseTrainer::step(const TrainingBatch& batch,
                                                 const Conditioning& uncond,
                                                 at::Generator& generator, int64_t i) {
  const auto& x0 = batch.x0;
  const auto& context = batch.conditioning;
  const auto device = x0.device();
  const auto t =
      grid_tensor_
          .index_select(0, rows_.of(torch::randint(0, static_cast<int64_t>(grid_.size()),
                                                   {rows_.global}, generator, torch::kInt64)))
          .to(device);
  const std::vector<int64_t> global_shape = {rows_.global, x0.size(1), x0.size(2), x0.size(3)};
  const auto eps = rows_.of(torch::randn(global_shape, generator, torch::kFloat32)).to(device);
  const auto x_t = student_input(schedule_, x0, eps, t);
  const auto teacher = guided(nets_.teacher_model(), context, uncond, stage_.teacher_guidance);
  const auto teacher_type = nets_.teacher_prediction_type();

  std::map<std::string, double> m;
  if (batch.wait_s) m["data_wait_s"] = *batch.wait_s;
  if (phase_.objective == Objective::kX0Warmup) {
    torch::Tensor target_x0;
    {
      torch::NoGradGuard no_grad;
      target_x0 =
          diffusion::split_model_output(teacher_type, teacher(x_t, t), x_t, schedule_.alpha_bar(t))
              .x0;
    }
    const auto x0_s =
        diffusion::split_model_output(stage_.prediction_type, nets_.student_output(x_t, t, context),
                                      x_t, schedule_.alpha_bar(t))
            .x0;
    mse_update(x0_s, target_x0, m);
    return m;
  }
  torch::Tensor t_prev;
  const auto target = teacher_target(teacher, teacher_type, schedule_, x_t, t, stage_.n(),
                                     stage_.teacher_steps, &t_prev);
  torch::Tensor x_prev;
  {
    // A discriminator warm-up needs no gradients through the student.
    std::optional<torch::NoGradGuard> frozen;
    if (!phase_.train_generator) frozen.emplace();
    x_prev = student_jump(stage_.prediction_type, schedule_, nets_.student_output(x_t, t, context),
                          x_t, t, t_prev);
  }
  if (phase_.adversarial())
    adversarial_updates(x_t, t, t_prev, target, x_prev, context, generator, i, m);
  else
    mse_update(x_prev, target, m);
  return m;
}

void PhaseTrainer::mse_update(const torch::Tensor& prediction, const torch::Tensor& target,
                              std::map<std::string, double>& m) {
  const auto loss = torch::mse_loss(prediction, target);
  update_student(loss, m);
  m["loss_mse"] = loss.item<double>();
}

void PhaseTrainer::adversarial_updates(const torch::Tensor& x_t, const torch::Tensor& t,
                                       const torch::Tensor& t_prev, const torch::Tensor& target,
                                       const torch::Tensor& x_prev, const Conditioning& context,
                                       at::Generator& generator, int64_t i,
                                       std::map<std::string, double>& m) {
  const auto device = x_t.device();
  // What the discriminator sees: x_t' at t', or both re-noised to t* (the 1-step student).
  torch::Tensor real = target, fake = x_prev, t_d = torch::clamp_min(t_prev, 0);
  if (!stage_.renoise_timesteps.empty()) {
    const int64_t done = adversarial_before_ + (phase_.train_generator ? i : 0);
    const bool late = done >= static_cast<int64_t>(stage_.renoise_switch * adversarial_total_);
    t_d = rows_
              .of(sample_timesteps(stage_.renoise_timesteps,
                                   late ? stage_.renoise_weights_late : stage_.renoise_weights,
                                   rows_.global, generator))
              .to(device);
    const std::vector<int64_t> global_shape = {rows_.global, x_t.size(1), x_t.size(2), x_t.size(3)};
    const auto n1 = rows_.of(torch::randn(global_shape, generator, torch::kFloat32)).to(device);
    const auto n2 = rows_.of(torch::randn(global_shape, generator, torch::kFloat32)).to(device);
    real = diffusion::add_noise(schedule_, target, n1, t_d);
    fake = diffusion::add_noise(schedule_, x_prev, n2, t_d);
  }
  const bool conditional = phase_.objective == Objective::kConditional;
  // Discriminator updates (the last one's losses and outputs are logged).
  torch::Tensor d_loss, real_logits, fake_logits;
  for (int64_t k = 0; k < stage_.discriminator_steps; ++k) {
    const auto f_t = conditional ? nets_.discriminator_features(x_t, t, context) : torch::Tensor();
    real_logits = nets_.discriminator_logits(real, t_d, context, f_t, conditional);
    fake_logits = nets_.discriminator_logits(fake.detach(), t_d, context, f_t, conditional);
    d_loss = discriminator_loss(real_logits, fake_logits);
    m["grad_norm_d"] =
        update(d_loss, disc_params_, *d_opt_, d_shards_, group_, recipe_.max_grad_norm);
  }
  m["loss_d"] = d_loss.item<double>();
  m["d_real"] = torch::sigmoid(real_logits).mean().item<double>();
  m["d_fake"] = torch::sigmoid(fake_logits).mean().item<double>();
  m["loss_mse"] = torch::mse_loss(x_prev.detach(), target).item<double>();
  if (!phase_.train_generator) return;
  // The student's update against the updated discriminator (which needs no gradients here).
  torch::Tensor f_t;
  if (conditional) {
    torch::NoGradGuard no_grad;
    f_t = nets_.discriminator_features(x_t, t, context);
  }
  for (auto& q : disc_params_)
    q.set_requires_grad(false);
  const auto g_loss =
      generator_loss(nets_.discriminator_logits(fake, t_d, context, f_t, conditional));
  update_student(g_loss, m);
  for (auto& q : disc_params_)
    q.set_requires_grad(true);
  m["loss_g"] = g_loss.item<double>();
}

void PhaseTrainer::update_average() {
  if (!average_.empty()) train::ema_update(average_, student_params_, stage_.ema_decay);
}

void PhaseTrainer::hand_on_average() {
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < average_.size(); ++k)
    student_params_[k].copy_(average_[k]);
}

PhaseTrainer::State PhaseTrainer::gather_state() {
  State state;
  state.student_adam = g_shards_ ? g_shards_->gather_state(*g_opt_, student_named_, group_)
                                 : train::adam_state_tensors(*g_opt_, student_named_);
  state.discriminator_adam = d_shards_ ? d_shards_->gather_state(*d_opt_, disc_named_, group_)
                                       : train::adam_state_tensors(*d_opt_, disc_named_);
  for (size_t k = 0; k < average_.size(); ++k)
    state.average.emplace_back(student_named_[k].first, average_[k]);
  return state;
}

}  // namespace lightning::distill
