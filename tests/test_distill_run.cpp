// The distillation stage trainer end to end on the shipped teacher: the quick recipe's outputs,
// exact resume, recipe refusals, and the things that must hold when it learns (the
// discriminator separates real from fake, the losses stay finite, the student beats its
// initialisation on FID at its step count).
#include <cmath>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "distill/recipe.h"
#include "distill/trainer.h"
#include "eval/classifier.h"
#include "eval/evaluate.h"
#include "generate/pipeline.h"
#include "io/safetensors.h"
#include "io/toml.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace lightning;

namespace {

distill::DistillOptions options_for(const std::string& out) {
  distill::DistillOptions o;
  o.out_dir = out;
  o.models_root = test::source_path("models");
  return o;
}

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);)
    out.push_back(nlohmann::json::parse(line));
  return out;
}

distill::DistillRecipe recipe_from(const std::string& text) {
  const auto path = test::temp_dir() + "/recipe.toml";
  std::ofstream(path) << text;
  return distill::DistillRecipe::load(path);
}

std::string error_of(const std::string& text) {
  try {
    recipe_from(text);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

const char* kHead = R"(task = "distill"
[teacher]
model = "fmnist-teacher"
)";

}  // namespace

TEST(DistillRecipe, RefusesBadRecipesNamingTheKey) {
  const std::string stage =
      "[[stages]]\nteacher_steps = 8\nstudent_steps = 4\nmse_iterations = 1\n";
  EXPECT_EQ(error_of(std::string(kHead) + stage), "");
  EXPECT_NE(error_of(std::string(kHead) + stage + "bogus = 1\n").find("bogus"), std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) + "[train]\nbatch = 3\n" + stage).find("batch"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) +
                     "[[stages]]\nteacher_steps = 8\nstudent_steps = 3\nmse_iterations = 1\n")
                .find("student_steps"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) + stage + "lora_rank = 0\n").find("lora_rank"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) + stage +
                     "[[stages]]\nteacher_steps = 2\nstudent_steps = 1\nmse_iterations = 1\n")
                .find("teacher_steps = 2"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) + stage + "x0_warmup_iterations = 3\n")
                .find("x0_warmup_iterations"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) + stage + "loss = \"gan\"\n").find("loss"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) + "[train]\nfrozen_weights_dtype = \"f8\"\n" + stage)
                .find("key 'frozen_weights_dtype': 'f8' is not one of f32, f16, bf16"),
            std::string::npos);
  EXPECT_NE(error_of("task = \"distill\"\n" + stage).find("model"), std::string::npos);
  EXPECT_NE(error_of(std::string(kHead)).find("stages"), std::string::npos);

  for (const char* shipped :
       {"recipes/fmnist-lightning.toml", "recipes/fmnist-lightning-1step.toml",
        "recipes/fmnist-lightning-4step.toml", "recipes/fmnist-progressive-mse.toml"})
    EXPECT_NO_THROW(distill::DistillRecipe::load(test::source_path(shipped))) << shipped;
  const auto q = distill::DistillRecipe::load(test::source_path("recipes/quick-distill.toml"));
  ASSERT_EQ(q.stages.size(), 3u);
  const auto phases = q.stages[1].phases();
  ASSERT_EQ(phases.size(), 3u);
  EXPECT_EQ(phases[0].name, "conditional");
  EXPECT_TRUE(phases[0].lora);
  EXPECT_EQ(phases[2].name, "full");
  EXPECT_FALSE(phases[2].lora);
  const auto one_step = q.stages[2].phases();
  ASSERT_EQ(one_step.size(), 5u);
  EXPECT_EQ(one_step[0].name, "x0_warmup");
  EXPECT_EQ(one_step[1].name, "conditional_d_warmup");
  EXPECT_FALSE(one_step[1].train_generator);
  EXPECT_EQ(one_step[1].objective, distill::Objective::kConditional);
  EXPECT_TRUE(one_step[2].train_generator);
  EXPECT_EQ(one_step[3].name, "unconditional_d_warmup");
  EXPECT_EQ(q.stages[2].discriminator_steps, 2);
  EXPECT_EQ(q.stages[1].ema_decay, 0.9);
  EXPECT_NE(error_of(std::string(kHead) + stage + "ema_decay = 1\n").find("ema_decay"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) + stage + "discriminator_warmup_iterations = 2\n")
                .find("discriminator_warmup_iterations"),
            std::string::npos);
  const std::string adversarial =
      "[[stages]]\nteacher_steps = 8\nstudent_steps = 4\nloss = \"adversarial\"\n"
      "conditional_iterations = 1\n";
  EXPECT_EQ(error_of(std::string(kHead) + adversarial), "");
  EXPECT_NE(error_of(std::string(kHead) + adversarial + "discriminator_steps = 0\n")
                .find("discriminator_steps"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(kHead) + adversarial + "discriminator_warmup_iterations = -1\n")
                .find("discriminator_warmup_iterations"),
            std::string::npos);
}

TEST(Cli, DistillRefusesBeforeTraining) {
  const auto dir = test::temp_dir();
  std::ofstream(dir + "/no-teacher.toml")
      << "task = \"distill\"\n[teacher]\nmodel = \"/nonexistent-teacher\"\n"
         "[[stages]]\nteacher_steps = 8\nstudent_steps = 4\nmse_iterations = 1\n";
  auto r =
      test::run_lightning("distill --recipe " + dir + "/no-teacher.toml --out " + dir + "/run");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("/nonexistent-teacher"), std::string::npos) << r.output;
  auto w =
      test::run_lightning("distill --recipe " + test::source_path("recipes/quick-distill.toml") +
                          " --out /proc/no-such-run");
  EXPECT_NE(w.exit_code, 0) << w.output;
  EXPECT_NE(w.output.find("/proc/no-such-run"), std::string::npos) << w.output;
  auto resume =
      test::run_lightning("distill --recipe " + test::source_path("recipes/quick-distill.toml") +
                          " --out " + dir + "/fresh --resume");
  EXPECT_EQ(resume.exit_code, 2) << resume.output;
  EXPECT_NE(resume.output.find("checkpoint"), std::string::npos) << resume.output;
}

// The quick recipe straight through, and the same stopped mid-stage (inside a LoRA phase) and
// resumed: the final students are bit-identical.
TEST(Distill, QuickRecipeWritesEveryOutputAndResumesExactly) {
  const auto recipe = distill::DistillRecipe::load(test::source_path("recipes/quick-distill.toml"));
  const auto dir = test::temp_dir();
  const auto straight = distill::run_distillation(recipe, options_for(dir + "/straight"));
  ASSERT_EQ(straight.model_dirs.size(), 3u);
  EXPECT_FALSE(straight.interrupted);

  // Outputs.
  for (const char* f : {"metrics.jsonl", "loss.png", "recipe.toml", "checkpoint/state.json"})
    EXPECT_TRUE(fs::exists(dir + "/straight/" + f)) << f;
  EXPECT_FALSE(fs::is_empty(dir + "/straight/samples"));
  const auto lora = io::SafetensorsFile(dir + "/straight/stage-2-4-to-2/lora.safetensors");
  EXPECT_TRUE(lora.contains("lora_unet_mid_block_resnets_0_conv1.lora_down.weight"));
  EXPECT_TRUE(lora.contains("lora_unet_mid_block_resnets_0_conv1.alpha"));
  EXPECT_FALSE(lora.contains("lora_unet_conv_in.lora_down.weight"));
  const auto one_step = generate::load_model(straight.model_dirs[2], {});
  EXPECT_EQ(one_step.scheduler.prediction_type, diffusion::PredictionType::kSample);
  EXPECT_EQ(one_step.recommended.steps, 1);
  EXPECT_EQ(one_step.recommended.guidance_scale, 1.0);
  const auto metrics = read_metrics(dir + "/straight/metrics.jsonl");
  bool saw_adversarial = false;
  for (const auto& m : metrics) {
    for (const char* key : {"loss_mse", "loss_g", "loss_d", "d_real", "d_fake", "grad_norm_g"})
      if (m.contains(key)) {
        EXPECT_TRUE(std::isfinite(m[key].get<double>())) << key;
      }
    saw_adversarial |= m.contains("loss_d") && m.contains("d_real") && m.contains("grad_norm_d");
    if (m["phase"] == "conditional_d_warmup") {  // the discriminator alone
      EXPECT_TRUE(m.contains("loss_d"));
      EXPECT_FALSE(m.contains("loss_g"));
    }
  }
  EXPECT_TRUE(saw_adversarial);
  EXPECT_EQ(metrics.back()["step"], recipe.total_iterations());

  // Stop at stage 1's end (iteration 12), inside stage 2's unconditional LoRA phase
  // (iterations 17..20), then inside stage 3's first discriminator warm-up (26..27), then resume
  // to the end.
  auto first = options_for(dir + "/split");
  first.until = 12;
  const auto stage_end = distill::run_distillation(recipe, first);
  EXPECT_EQ(stage_end.model_dirs.size(), 1u);
  // A stage's end needs no trained state: the next stage starts from the saved model.
  std::vector<std::string> held;
  for (const auto& entry : fs::directory_iterator(dir + "/split/checkpoint"))
    held.push_back(entry.path().filename().string());
  EXPECT_EQ(held, std::vector<std::string>{"state.json"});
  first.resume = true;
  first.until = 19;
  const auto part = distill::run_distillation(recipe, first);
  EXPECT_EQ(part.iterations, 19);
  EXPECT_EQ(part.model_dirs.size(), 1u);
  EXPECT_TRUE(fs::exists(dir + "/split/checkpoint/lora.safetensors"));
  // Iterations 26..27 train the discriminator alone: the student is the same before and after.
  auto middle = options_for(dir + "/split");
  middle.resume = true;
  middle.until = 25;
  EXPECT_EQ(distill::run_distillation(recipe, middle).iterations, 25);
  const auto student_25 = io::load_safetensors(dir + "/split/checkpoint/student.safetensors");
  const auto disc_25 = io::load_safetensors(dir + "/split/checkpoint/discriminator.safetensors");
  middle.until = 26;
  EXPECT_EQ(distill::run_distillation(recipe, middle).iterations, 26);
  middle.until = 27;
  EXPECT_EQ(distill::run_distillation(recipe, middle).iterations, 27);
  const auto student_27 = io::load_safetensors(dir + "/split/checkpoint/student.safetensors");
  const auto disc_27 = io::load_safetensors(dir + "/split/checkpoint/discriminator.safetensors");
  for (const auto& [name, t] : student_25)
    ASSERT_TRUE(torch::equal(t, student_27.at(name))) << name;
  bool disc_changed = false;
  for (const auto& [name, t] : disc_25)
    disc_changed |= !torch::equal(t, disc_27.at(name));
  EXPECT_TRUE(disc_changed);
  auto second = options_for(dir + "/split");
  second.resume = true;
  const auto rest = distill::run_distillation(recipe, second);
  ASSERT_EQ(rest.model_dirs.size(), 3u);
  for (const char* stage : {"stage-2-4-to-2", "stage-3-2-to-1"}) {
    const auto a = io::load_safetensors(dir + "/straight/" + stage +
                                        "/model/unet/diffusion_pytorch_model.safetensors");
    const auto b = io::load_safetensors(dir + "/split/" + stage +
                                        "/model/unet/diffusion_pytorch_model.safetensors");
    ASSERT_EQ(a.size(), b.size());
    for (const auto& [name, t] : a)
      ASSERT_TRUE(torch::equal(t, b.at(name))) << stage << " " << name;
  }
  // A finished run resumes to nothing.
  EXPECT_EQ(distill::run_distillation(recipe, second).model_dirs.size(), 3u);
}

// frozen_weights_dtype = "f16": the teacher (and the LoRA student's base, which shares it) stays
// in the f16 of its files, converted layer by layer as it computes; whatever trains is float32.
// With this f16 teacher that is the float32 run exactly: every stage's model and the LoRA file
// bit for bit.
TEST(Distill, HalfPrecisionFrozenWeightsGiveTheFloat32RunOfAnF16Teacher) {
  auto recipe = distill::DistillRecipe::load(test::source_path("recipes/quick-distill.toml"));
  ASSERT_EQ(io::SafetensorsFile(
                test::source_path("models/fmnist-teacher/unet/diffusion_pytorch_model.safetensors"))
                .get("conv_in.weight")
                .scalar_type(),
            torch::kHalf);
  const auto dir = test::temp_dir();
  const auto wide = distill::run_distillation(recipe, options_for(dir + "/f32"));
  recipe.frozen_weights_dtype = "f16";
  auto options = options_for(dir + "/f16");
  std::vector<torch::ScalarType> held;  // each stage's teacher: its UNet's, text encoder's
  options.teacher_loaded = [&](const std::string&, const generate::TextToImageModel& teacher) {
    held.push_back(teacher.unet->conv_in->weight.scalar_type());
    held.push_back(teacher.text_encoder->parameters().front().scalar_type());
  };
  const auto half = distill::run_distillation(recipe, options);
  ASSERT_EQ(half.model_dirs.size(), 3u);
  EXPECT_EQ(held, std::vector<torch::ScalarType>(6, torch::kHalf));
  for (size_t s = 0; s < 3; ++s) {
    const auto a =
        io::load_safetensors(wide.model_dirs[s] + "/unet/diffusion_pytorch_model.safetensors");
    const auto b =
        io::load_safetensors(half.model_dirs[s] + "/unet/diffusion_pytorch_model.safetensors");
    ASSERT_EQ(a.size(), b.size());
    for (const auto& [name, t] : a)
      ASSERT_TRUE(torch::equal(t, b.at(name))) << "stage " << s + 1 << " " << name;
  }
  const auto lora_a = io::load_safetensors(dir + "/f32/stage-2-4-to-2/lora.safetensors");
  const auto lora_b = io::load_safetensors(dir + "/f16/stage-2-4-to-2/lora.safetensors");
  for (const auto& [name, t] : lora_a) {
    EXPECT_EQ(lora_b.at(name).scalar_type(), torch::kFloat32) << name;
    ASSERT_TRUE(torch::equal(t, lora_b.at(name))) << name;
  }
}

// With f16 frozen weights a model directory's fp16 variant files are preferred: SDXL's
// repositories hold both, and the fp16 ones are held as they are, memory-mapped.
TEST(Distill, F16FrozenWeightsPreferTheFp16Variant) {
  // First: recipe_from writes into the test's directory, which temp_dir() then empties.
  const auto recipe = recipe_from(std::string(kHead) +
                                  "[train]\nbatch_size = 2\nfrozen_weights_dtype = \"f16\"\n"
                                  "[sample]\nper_class = 1\n"
                                  "[[stages]]\nteacher_steps = 2\nstudent_steps = 1\n"
                                  "mse_iterations = 1\n");
  const auto dir = test::temp_dir();
  const auto root = dir + "/models";
  fs::create_directories(root);
  fs::copy(test::source_path("models/fmnist-teacher"), root + "/fmnist-teacher",
           fs::copy_options::recursive);
  const auto unet = root + "/fmnist-teacher/unet/";
  std::vector<std::pair<std::string, torch::Tensor>> wide, narrow;
  for (const auto& [name, t] : io::load_safetensors(unet + "diffusion_pytorch_model.safetensors")) {
    wide.emplace_back(name, t.to(torch::kFloat32));
    narrow.emplace_back(name, name == "conv_in.weight" ? t * 0.5 : t);  // told apart
  }
  io::save_safetensors(unet + "diffusion_pytorch_model.safetensors", wide);
  io::save_safetensors(unet + "diffusion_pytorch_model.fp16.safetensors", narrow);
  auto options = options_for(dir + "/run");
  options.models_root = root;
  torch::Tensor conv_in;
  options.teacher_loaded = [&](const std::string&, const generate::TextToImageModel& teacher) {
    if (!conv_in.defined()) conv_in = teacher.unet->conv_in->weight.detach().clone();
  };
  distill::run_distillation(recipe, options);
  ASSERT_TRUE(conv_in.defined());
  EXPECT_EQ(conv_in.scalar_type(), torch::kHalf);
  for (const auto& [name, t] : narrow)
    if (name == "conv_in.weight") EXPECT_TRUE(torch::equal(conv_in, t));
}

// What must hold when it learns. MSE stage: the guided teacher's 8 steps distilled into 4
// unguided student steps beats the student's initialisation (the teacher, 4 steps, no CFG) on
// FID. Adversarial stage: the discriminator's outputs on real (teacher) and fake (student)
// samples separate and its loss falls below chance (2 ln 2); the losses stay finite.
TEST(Distill, StudentsLearnAndTheDiscriminatorSeparates) {
  const auto recipe = recipe_from(std::string(kHead) + R"(
[train]
batch_size = 16
[log]
log_every = 5
sample_every = 1000
checkpoint_every = 1000
[[stages]]
teacher_steps = 8
student_steps = 4
teacher_guidance = 5.0
mse_iterations = 30
learning_rate = 3e-4
[[stages]]
teacher_steps = 4
student_steps = 1
loss = "adversarial"
unconditional_iterations = 30
learning_rate = 1e-5
discriminator_learning_rate = 1e-3
head_channels = 32
)");
  const auto dir = test::temp_dir();
  const auto result = distill::run_distillation(recipe, options_for(dir));
  ASSERT_EQ(result.model_dirs.size(), 2u);

  const auto metrics = read_metrics(dir + "/metrics.jsonl");
  std::vector<nlohmann::json> adversarial;
  for (const auto& m : metrics)
    if (m.contains("loss_d")) adversarial.push_back(m);
  ASSERT_GE(adversarial.size(), 4u);
  const auto& last = adversarial.back();
  EXPECT_GT(last["d_real"].get<double>(), last["d_fake"].get<double>());
  EXPECT_LT(last["loss_d"].get<double>(), adversarial.front()["loss_d"].get<double>());
  EXPECT_LT(last["loss_d"].get<double>(), 2 * std::log(2.0));
  for (const auto& m : adversarial)
    EXPECT_TRUE(std::isfinite(m["loss_g"].get<double>()));

  auto classifier = eval::load_classifier(test::source_path("models/fmnist-classifier"));
  eval::EvalOptions options;
  options.num_images = 200;
  const auto reference = eval::reference_stats(classifier, options);
  const auto init = generate::load_model(test::source_path("models/fmnist-teacher"), {});
  const auto student = generate::load_model(result.model_dirs[0], {});
  const auto before = eval::evaluate_model(init, classifier, reference,
                                           diffusion::SamplerKind::kEuler, 4, 1.0, options);
  const auto after = eval::evaluate_model(student, classifier, reference,
                                          diffusion::SamplerKind::kEuler, 4, 1.0, options);
  EXPECT_LT(after.fid, before.fid);
  EXPECT_GT(after.prompt_accuracy, before.prompt_accuracy);
}

TEST(Cli, DistillCtrlCWritesACheckpointAndResumes) {
  const auto dir = test::temp_dir();
  const auto recipe = test::source_path("recipes/quick-distill.toml");
  // Ctrl-C once training has begun (the first metrics line, at iteration 2 of 35), not after a
  // fixed time that a faster machine may spend on the whole run.
  const std::string metrics = dir + "/run/metrics.jsonl";
  auto r = test::run_lightning("distill --recipe " + recipe + " --out " + dir +
                               "/run --threads 1 2>&1 & pid=$!; for i in $(seq 1200); do [ -s " +
                               metrics + " ] && break; sleep 0.1; done; kill -INT $pid; wait $pid");
  EXPECT_EQ(r.exit_code, 130) << r.output;
  EXPECT_NE(r.output.find("interrupted"), std::string::npos) << r.output;
  ASSERT_TRUE(fs::exists(dir + "/run/checkpoint/state.json"));
  auto resumed = test::run_lightning("distill --recipe " + recipe + " --out " + dir +
                                     "/run --resume --threads 1");
  EXPECT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_TRUE(fs::exists(dir + "/run/stage-3-2-to-1/model/lightning.json"));
}
