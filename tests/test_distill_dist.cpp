// Data-parallel distillation over Gloo on loopback: two processes follow one process with the
// same global batch; a dead rank, a hung rank, an unreachable rendezvous and mismatched recipes
// end every rank with a line naming the cause instead of hanging; Ctrl-C stops every rank with
// one checkpoint; a checkpoint that cannot be written leaves the previous one as it was.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <sstream>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "core/error.h"
#include "dist/group.h"
#include "io/safetensors.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace lightning;

namespace {

std::string quick_recipe() {
  return test::source_path("recipes/quick-distill.toml");
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A loopback port that nothing listens on: bound to port 0, read back, released.
int unused_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::vector<std::string> read_lines(const std::string& path) {
  std::vector<std::string> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);)
    lines.push_back(line);
  return lines;
}

// `RANK=r WORLD_SIZE=n ... lightning args` as a shell prefix.
std::string rank_command(int rank, int world, int port, const std::string& args) {
  return "RANK=" + std::to_string(rank) + " WORLD_SIZE=" + std::to_string(world) +
         " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " + LIGHTNING_BIN + " " +
         args;
}

// Two ranks started by hand on `port`: rank 1 in the background (its output in `rank1_log`),
// rank 0 in the foreground, whose result this is. `setup` (shell: cd, variables) precedes each.
test::CommandResult two_ranks(int port, const std::string& rank0_args,
                              const std::string& rank1_args, const std::string& rank1_log,
                              const std::string& setup0 = "", const std::string& setup1 = "") {
  return test::run_command("(" + setup1 + rank_command(1, 2, port, rank1_args) + " > " + rank1_log +
                           " 2>&1 &) ; " + setup0 + rank_command(0, 2, port, rank0_args));
}

// The quick recipe with a first stage too long to finish during a test, to stop it from outside.
std::string long_recipe(const std::string& dir) {
  auto text = read_text(quick_recipe());
  const std::string from = "mse_iterations = 12";
  const auto at = text.find(from);
  EXPECT_NE(at, std::string::npos);
  text.replace(at, from.size(), "mse_iterations = 100000");
  const std::string every = "checkpoint_every = 5";  // no slow checkpoint while ranks wait
  const auto every_at = text.find(every);
  EXPECT_NE(every_at, std::string::npos);
  text.replace(every_at, every.size(), "checkpoint_every = 100000");
  std::ofstream(dir + "/long.toml") << text;
  return dir + "/long.toml";
}

// `distill` of `recipe` into dir/run on 2 ranks (--nproc), with --dist-timeout `timeout_s`.
std::string two_rank_run(const std::string& recipe, const std::string& dir, int timeout_s) {
  return "distill --recipe " + recipe + " --out " + dir +
         "/run --nproc 2 --threads 2 --dist-timeout " + std::to_string(timeout_s);
}

// `lightning args` in the background as the leader of its own process group (as a shell job in
// a terminal: Ctrl-C reaches the launcher and every rank), logging to dir/log.txt; killed with
// its group if still running when the test ends.
class BackgroundJob {
 public:
  BackgroundJob(const std::string& dir, const std::string& args) : dir_(dir) {
    std::system(("(setsid -w sh -c 'echo $$ > " + dir + "/pid; exec " + LIGHTNING_BIN + " " + args +
                 "' > " + dir + "/log.txt 2>&1; echo $? > " + dir + "/rc) &")
                    .c_str());
  }
  ~BackgroundJob() {
    if (leader_ <= 0 || exit_code()) return;
    if (::kill(-leader_, SIGKILL) != 0) {  // no process group of its own: each process
      ::kill(leader_, SIGKILL);
      for (pid_t pid : ranks_)
        ::kill(pid, SIGKILL);
    }
    wait(std::chrono::seconds(10));
  }
  std::string log() const { return read_text(dir_ + "/log.txt"); }

  // Waits until `metrics` has a line and the launcher has named the ranks' pids; false on
  // timeout. Then leader() is the launcher's pid and rank_pid(r) rank r's.
  bool wait_for_training(const std::string& metrics, std::chrono::seconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::smatch match;
    while (std::chrono::steady_clock::now() < deadline) {
      const auto text = log();
      if (leader_ <= 0 && fs::exists(dir_ + "/pid") && !read_text(dir_ + "/pid").empty())
        leader_ = std::stoi(read_text(dir_ + "/pid"));
      if (leader_ > 0 && fs::exists(metrics) && !fs::is_empty(metrics) &&
          std::regex_search(text, match, std::regex(R"(\(pids (\d+), (\d+)\))"))) {
        ranks_ = {std::stoi(match[1].str()), std::stoi(match[2].str())};
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }
  // The same for a run into dir/run, within two minutes.
  bool wait_for_training() {
    return wait_for_training(dir_ + "/run/metrics.jsonl", std::chrono::seconds(120));
  }
  pid_t leader() const { return leader_; }
  pid_t rank_pid(int r) const { return ranks_.at(static_cast<size_t>(r)); }

  // The job's exit status once it has ended.
  std::optional<int> exit_code() const {
    const auto text = read_text(dir_ + "/rc");
    if (text.empty() || text.back() != '\n') return std::nullopt;
    return std::stoi(text);
  }
  std::optional<int> wait(std::chrono::seconds timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!exit_code() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return exit_code();
  }

 private:
  std::string dir_;
  pid_t leader_ = -1;
  std::vector<pid_t> ranks_;
};

int64_t checkpoint_iteration(const std::string& run) {
  return nlohmann::json::parse(read_text(run + "/checkpoint/state.json")).at("iteration");
}

}  // namespace

TEST(Dist, LaunchEnvironmentIsReadAndCheckedNamingTheVariable) {
  ::unsetenv("WORLD_SIZE");
  EXPECT_FALSE(dist::launch_env_from_environment().has_value());
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("RANK", "1", 1);
  ::setenv("MASTER_ADDR", "10.0.0.7", 1);
  ::setenv("MASTER_PORT", "29511", 1);
  ::unsetenv("LOCAL_RANK");
  const auto env = dist::launch_env_from_environment();
  ASSERT_TRUE(env.has_value());
  EXPECT_EQ(env->rank, 1);
  EXPECT_EQ(env->world_size, 2);
  EXPECT_EQ(env->local_rank, 1);
  EXPECT_EQ(env->master_addr, "10.0.0.7");
  EXPECT_EQ(env->master_port, 29511);
  auto error_with = [](const char* name, const char* value) -> std::string {
    const char* old = std::getenv(name);
    const std::string saved = old ? old : "";
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
    std::string what;
    try {
      dist::launch_env_from_environment();
    } catch (const UsageError& e) {
      what = e.what();
    }
    ::setenv(name, saved.c_str(), 1);
    return what;
  };
  EXPECT_NE(error_with("RANK", "2").find("RANK=2"), std::string::npos);
  EXPECT_NE(error_with("RANK", nullptr).find("RANK"), std::string::npos);
  EXPECT_NE(error_with("WORLD_SIZE", "two").find("WORLD_SIZE=two"), std::string::npos);
  EXPECT_NE(error_with("MASTER_PORT", "70000").find("MASTER_PORT=70000"), std::string::npos);
  EXPECT_NE(error_with("MASTER_ADDR", nullptr).find("MASTER_ADDR"), std::string::npos);
  for (const char* v : {"WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"})
    ::unsetenv(v);
  // A rank without its job (WORLD_SIZE forgotten) is refused, not trained as a single process.
  ::setenv("RANK", "1", 1);
  try {
    dist::launch_env_from_environment();
    ADD_FAILURE() << "RANK without WORLD_SIZE";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("RANK=1 is set but WORLD_SIZE is not"), std::string::npos)
        << e.what();
  }
  ::unsetenv("RANK");

  // A group of one: every collective is the identity.
  const dist::Group single;
  EXPECT_EQ(single.size(), 1);
  EXPECT_TRUE(single.is_main());
  auto p = torch::ones({3}, torch::requires_grad());
  (p * 2).sum().backward();
  single.average_gradients({p});
  EXPECT_TRUE(torch::equal(p.grad(), torch::full({3}, 2.0)));
  EXPECT_EQ(single.sum({1.5, 2}), (std::vector<double>{1.5, 2}));
  EXPECT_TRUE(single.device().is_cpu());

  // Ranks on GPUs need NCCL: a build without it says so before any rendezvous (rank 0 would
  // otherwise wait the 60 s for rank 1).
  if (!dist::nccl_available()) {
    dist::LaunchEnv gpus;
    gpus.world_size = 2;
    gpus.master_port = unused_port();
    try {
      dist::Group::connect(gpus, std::chrono::seconds(60), c10::Device(c10::kCUDA, 0));
      ADD_FAILURE() << "a CUDA group without NCCL";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("rank 0: this build has no NCCL"), std::string::npos)
          << e.what();
    }
  }
}

// The whole quick recipe (MSE, LoRA and full adversarial phases, the x0 switch, re-noising,
// discriminator warm-up, EMA, stage handovers) on one process and on two with the same global
// batch: the same training, up to float rounding; and a two-rank run stopped and resumed.
TEST(Dist, TwoProcessesFollowOneProcess) {
  const auto dir = test::temp_dir();
  auto distill = [&](const std::string& run, const std::string& flags) {
    return test::run_lightning("distill --recipe " + quick_recipe() + " --out " + dir + "/" + run +
                               " " + flags);
  };
  auto one = distill("one", "--threads 1");
  ASSERT_EQ(one.exit_code, 0) << one.output;
  auto two = distill("two", "--nproc 2 --threads 2");
  ASSERT_EQ(two.exit_code, 0) << two.output;
  EXPECT_NE(two.output.find("launched 2 ranks"), std::string::npos) << two.output;
  // Rank 0 alone prints the stage directories.
  const std::string printed = "\n" + dir + "/two/stage-1-8-to-4/model\n";
  const auto at = two.output.find(printed);
  EXPECT_NE(at, std::string::npos) << two.output;
  EXPECT_EQ(two.output.find(printed, at + 1), std::string::npos) << two.output;

  // Gradients agree to float rounding, but Adam's first steps are sign-like (update ~ lr for
  // any gradient, however small) and the adversarial phases feed differences back, so they grow
  // along the chain: measured 0.08 % of the weights' change after stage 1 (MSE), 1.3 % after
  // stage 2 and 23 % after stage 3, with the adversarial losses and D's outputs within 0.07 %
  // on every line and the student's MSE to the teacher within 0.04 % up to stage 2's full phase
  // (where it reached 7 %).
  auto drift = [&](const std::string& stage) {  // |two - one| / |one - teacher|, over the UNet
    const std::string file = "/" + stage + "/model/unet/diffusion_pytorch_model.safetensors";
    io::SafetensorsFile a(dir + "/one" + file), b(dir + "/two" + file),
        init(test::source_path("models/fmnist-teacher/unet/diffusion_pytorch_model.safetensors"));
    EXPECT_EQ(a.keys(), b.keys());
    double diff = 0, moved = 0;
    for (const auto& name : a.keys()) {
      const auto x = a.get(name).to(torch::kFloat64);
      diff += (x - b.get(name).to(torch::kFloat64)).square().sum().item<double>();
      moved += (x - init.get(name).to(torch::kFloat64)).square().sum().item<double>();
    }
    return std::sqrt(diff / moved);
  };
  EXPECT_LT(drift("stage-1-8-to-4"), 1e-2);
  EXPECT_LT(drift("stage-2-4-to-2"), 0.1);
  const auto lines_one = read_lines(dir + "/one/metrics.jsonl");
  const auto lines_two = read_lines(dir + "/two/metrics.jsonl");
  ASSERT_EQ(lines_one.size(), lines_two.size());
  for (size_t i = 0; i < lines_one.size(); ++i) {
    const auto a = nlohmann::json::parse(lines_one[i]), b = nlohmann::json::parse(lines_two[i]);
    ASSERT_EQ(a["step"], b["step"]);
    ASSERT_EQ(a["phase"], b["phase"]);
    // The adversarial game's numbers on every line; the student's distance to the teacher's
    // target (loss_mse) is the most sensitive and is compared before the weights drift.
    for (const char* key : {"loss_mse", "loss_g", "loss_d", "d_real", "d_fake"})
      if (a.contains(key) && (std::string(key) != "loss_mse" || a["step"] <= 20)) {
        const double x = a[key], y = b.value(key, 0.0);
        EXPECT_NEAR(y, x, 1e-2 * std::abs(x)) << key << " at step " << a["step"];
      }
    if (a["phase"] == "mse") {
      const double x = a["grad_norm_g"], y = b["grad_norm_g"];
      EXPECT_NEAR(y, x, 1e-2 * x) << "grad_norm_g at step " << a["step"];
    }
  }
  // The stage models of two runs, bit for bit (f32 weights that differ would, almost surely,
  // differ in f16 too).
  auto expect_same_models = [&](const std::string& x, const std::string& y) {
    for (const char* stage : {"stage-1-8-to-4", "stage-2-4-to-2", "stage-3-2-to-1"}) {
      const std::string file =
          std::string("/") + stage + "/model/unet/diffusion_pytorch_model.safetensors";
      io::SafetensorsFile a(dir + "/" + x + file), b(dir + "/" + y + file);
      ASSERT_EQ(a.keys(), b.keys());
      for (const auto& name : a.keys())
        ASSERT_TRUE(torch::equal(a.get(name), b.get(name))) << y << file << ": " << name;
    }
  };
  // Stopped inside stage 2's LoRA phase and resumed on two ranks (each reads rank 0's
  // checkpoint): bit-identical to the straight two-rank run.
  auto part = distill("resumed", "--nproc 2 --threads 2 --until 15");
  ASSERT_EQ(part.exit_code, 0) << part.output;
  fs::copy(dir + "/resumed/checkpoint", dir + "/checkpoint-15");
  auto rest = distill("resumed", "--nproc 2 --threads 2 --resume");
  ASSERT_EQ(rest.exit_code, 0) << rest.output;
  expect_same_models("two", "resumed");

  // The same with Adam's moments sharded over the ranks (ZeRO stage 1): each rank updates its
  // share and broadcasts it, the checkpoint gathers the moments; bit-identical again, in the
  // checkpoint at iteration 15 and in the stage models.
  std::string sharded_recipe = read_text(quick_recipe());
  const auto train_at = sharded_recipe.find("[train]\n");
  ASSERT_NE(train_at, std::string::npos);
  sharded_recipe.insert(train_at + 8, "shard_optimizer = true\n");
  std::ofstream(dir + "/sharded.toml") << sharded_recipe;
  auto sharded = [&](const std::string& flags) {
    return test::run_lightning("distill --recipe " + dir + "/sharded.toml --out " + dir +
                               "/sharded --nproc 2 --threads 2 " + flags);
  };
  auto sharded_part = sharded("--until 15");
  ASSERT_EQ(sharded_part.exit_code, 0) << sharded_part.output;
  for (const char* file :
       {"student.safetensors", "discriminator.safetensors", "lora.safetensors",
        "student_optimizer.safetensors", "discriminator_optimizer.safetensors"}) {
    io::SafetensorsFile a(dir + "/checkpoint-15/" + file), b(dir + "/sharded/checkpoint/" + file);
    EXPECT_EQ(a.keys(), b.keys()) << file;
    for (const auto& name : a.keys())
      ASSERT_TRUE(torch::equal(a.get(name), b.get(name))) << file << ": " << name;
  }
  auto sharded_rest = sharded("--resume");
  ASSERT_EQ(sharded_rest.exit_code, 0) << sharded_rest.output;
  expect_same_models("two", "sharded");

  // Rank 0 logs for both, with each rank's compute time.
  const auto first = nlohmann::json::parse(lines_two.front());
  EXPECT_EQ(first.value("ranks", 0), 2);
  EXPECT_TRUE(first.contains("rank0_compute_s") && first.contains("rank1_compute_s"))
      << lines_two.front();
  EXPECT_FALSE(nlohmann::json::parse(lines_one.front()).contains("ranks"));
}

TEST(Dist, ADeadRankEndsTheOthersWithALineNamingIt) {
  const auto dir = test::temp_dir();
  const auto log = dir + "/log.txt";
  // The job in the background; its exit status lands in rc.
  std::system(("(" + std::string(LIGHTNING_BIN) + " distill --recipe " + quick_recipe() +
               " --out " + dir + "/run --nproc 2 --threads 2 --dist-timeout 20 > " + log +
               " 2>&1; echo $? > " + dir + "/rc) &")
                  .c_str());
  // Wait for training to start (the first metrics line), then kill rank 1.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  std::smatch match;
  std::string text;
  while (std::chrono::steady_clock::now() < deadline) {
    text = read_text(log);
    if (fs::exists(dir + "/run/metrics.jsonl") && !fs::is_empty(dir + "/run/metrics.jsonl") &&
        std::regex_search(text, match, std::regex(R"(\(pids (\d+), (\d+)\))")))
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ASSERT_FALSE(match.empty()) << text;
  ASSERT_EQ(::kill(std::stoi(match[2].str()), SIGKILL), 0);
  while (std::chrono::steady_clock::now() < deadline && !fs::exists(dir + "/rc"))
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_TRUE(fs::exists(dir + "/rc")) << "the job did not end after rank 1 died";
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_NE(std::stoi(read_text(dir + "/rc")), 0);
  text = read_text(log);
  EXPECT_NE(text.find("rank 1 (pid " + match[2].str() + ") was killed by signal 9"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("rank 0:"), std::string::npos) << text;
  EXPECT_NE(text.find("rank 1 (last iteration"), std::string::npos) << text;
}

TEST(Dist, UnreachableRendezvousAndMismatchedRecipesAreRefused) {
  const auto dir = test::temp_dir();
  const int port = unused_port(), port2 = unused_port();
  // Rank 1 waits for a rank 0 that never comes.
  auto lonely = test::run_command(rank_command(
      1, 2, port,
      "distill --recipe " + quick_recipe() + " --out " + dir + "/lonely --dist-timeout 2"));
  EXPECT_EQ(lonely.exit_code, 1) << lonely.output;
  EXPECT_NE(lonely.output.find("127.0.0.1:" + std::to_string(port)), std::string::npos)
      << lonely.output;
  EXPECT_NE(lonely.output.find("within 2 s"), std::string::npos) << lonely.output;

  // Two ranks with different recipes: both refuse before training.
  const auto other = dir + "/other.toml";
  fs::copy_file(quick_recipe(), other);
  std::ofstream(other, std::ios::app) << "\n# changed\n";
  const auto mismatch = two_ranks(
      port2, "distill --recipe " + quick_recipe() + " --out " + dir + "/m --dist-timeout 30",
      "distill --recipe " + other + " --out " + dir + "/m --dist-timeout 30", dir + "/rank1.txt");
  EXPECT_EQ(mismatch.exit_code, 1) << mismatch.output;
  EXPECT_NE(mismatch.output.find("the recipe and options differ between rank 0 and rank 1"),
            std::string::npos)
      << mismatch.output;
  EXPECT_FALSE(fs::exists(dir + "/m/metrics.jsonl"));

  // A batch that does not split over the ranks.
  auto odd = test::run_lightning("distill --recipe " + quick_recipe() + " --out " + dir +
                                 "/odd --nproc 3 --threads 3");
  EXPECT_NE(odd.exit_code, 0) << odd.output;
  EXPECT_NE(odd.output.find("batch_size = 8 does not split evenly over 3 ranks"), std::string::npos)
      << odd.output;
}

TEST(Dist, CtrlCStopsEveryRankAtOneIterationWithOneCheckpoint) {
  const auto dir = test::temp_dir();
  const auto recipe = long_recipe(dir);
  BackgroundJob job(dir, two_rank_run(recipe, dir, 30));
  ASSERT_TRUE(job.wait_for_training()) << job.log();
  // What a terminal does on Ctrl-C: SIGINT to the launcher and to both ranks.
  ASSERT_EQ(::kill(-job.leader(), SIGINT), 0);
  const auto rc = job.wait(std::chrono::seconds(60));
  ASSERT_TRUE(rc.has_value()) << "the job did not stop after Ctrl-C\n" << job.log();
  const auto text = job.log();
  EXPECT_EQ(*rc, 130) << text;
  std::smatch match;
  ASSERT_TRUE(std::regex_search(
      text, match, std::regex(R"(interrupted at iteration (\d+); checkpoint written)")))
      << text;
  const int64_t stopped = std::stoll(match[1].str());
  EXPECT_EQ(checkpoint_iteration(dir + "/run"), stopped);
  EXPECT_EQ(text.find("exited with status"), std::string::npos) << text;  // no rank failed

  // Both ranks continue from it.
  auto resumed = test::run_lightning("distill --recipe " + recipe + " --out " + dir +
                                     "/run --nproc 2 --threads 2 --resume --until " +
                                     std::to_string(stopped + 2));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_EQ(checkpoint_iteration(dir + "/run"), stopped + 2);
}

TEST(Dist, TheLauncherTerminatesRanksThatOutliveTheTimeout) {
  // Rank 1 dies while rank 0 is stopped (SIGSTOP: it cannot notice): after the grace time
  // (--dist-timeout + 10 s) the launcher terminates rank 0 and names it.
  const auto dir = test::temp_dir();
  BackgroundJob job(dir, two_rank_run(long_recipe(dir), dir, 5));
  ASSERT_TRUE(job.wait_for_training()) << job.log();
  ASSERT_EQ(::kill(job.rank_pid(0), SIGSTOP), 0);
  ASSERT_EQ(::kill(job.rank_pid(1), SIGKILL), 0);
  const auto killed_at = std::chrono::steady_clock::now();
  const auto rc = job.wait(std::chrono::seconds(60));
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  ASSERT_TRUE(rc.has_value()) << "the launcher did not end the stopped rank\n" << job.log();
  const auto text = job.log();
  EXPECT_EQ(*rc, 128 + SIGKILL) << text;  // the status of the rank that failed first
  EXPECT_NE(text.find("rank 1 (pid " + std::to_string(job.rank_pid(1)) +
                      ") was killed by signal 9; waiting up to 15 s"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("rank(s) 0 still running 15 s after the failure: terminating them (SIGTERM)"),
            std::string::npos)
      << text;
  EXPECT_GE(took, 15.0);
  EXPECT_LT(took, 45.0);
  errno = 0;
  EXPECT_EQ(::kill(job.rank_pid(0), 0), -1);  // gone, and reaped by the launcher
  EXPECT_EQ(errno, ESRCH);
}

TEST(Dist, ACheckpointThatCannotBeWrittenLeavesThePreviousOne) {
  // A disk that fills up during rank 0's checkpoint, made with a file-size limit (prlimit
  // --fsize): the write fails (EFBIG rather than ENOSPC, through the same code), the job ends
  // with the file named, the previous checkpoint is untouched and both ranks resume from it.
  if (test::run_command("prlimit --version").exit_code != 0) GTEST_SKIP() << "no prlimit";
  const auto dir = test::temp_dir();
  const auto run = dir + "/run";
  const std::string args = "distill --recipe " + quick_recipe() + " --out " + run +
                           " --nproc 2 --threads 2 --dist-timeout 20 ";
  auto first = test::run_lightning(args + "--until 5");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  std::map<std::string, std::string> before;
  for (const auto& entry : fs::directory_iterator(run + "/checkpoint"))
    before[entry.path().filename().string()] = read_text(entry.path().string());
  ASSERT_TRUE(before.count("student.safetensors"));
  // Every file up to the checkpoint fits (logs, metrics, plots); the student's weights do not.
  const auto limit = before["student.safetensors"].size() - 1;
  auto full = test::run_command("prlimit --fsize=" + std::to_string(limit) + " " + LIGHTNING_BIN +
                                " " + args + "--resume --until 10");
  ASSERT_NE(full.exit_code, 0) << full.output;
  EXPECT_TRUE(std::regex_search(
      full.output, std::regex(R"(student\.safetensors\S*: write failed: File too large)")))
      << full.output;

  std::map<std::string, std::string> after;
  for (const auto& entry : fs::directory_iterator(run + "/checkpoint"))
    after[entry.path().filename().string()] = read_text(entry.path().string());
  EXPECT_TRUE(after == before) << "the checkpoint of iteration 5 changed";
  for (const auto& entry : fs::directory_iterator(run))
    EXPECT_EQ(entry.path().filename().string().find("checkpoint."), std::string::npos)
        << "left behind: " << entry.path();

  auto again = test::run_lightning(args + "--resume --until 10");
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_EQ(checkpoint_iteration(run), 10);
}

// Rank 0's work alone (checkpoints, samples, stage models) may outlast the collectives' timeout:
// the others wait while it shows signs of life, and its error reaches them by name.
TEST(Dist, WorkOnRankZeroAloneOutlastsTheTimeoutAndItsErrorReachesTheOthers) {
  if (!dist::gloo_available()) GTEST_SKIP() << "no Gloo in this build";
  dist::LaunchEnv env;
  env.world_size = 2;
  env.master_port = unused_port();
  std::vector<std::string> outcome(2);
  auto rank = [&](int r) {
    auto e = env;
    e.rank = r;
    try {
      const auto group = dist::Group::connect(e, std::chrono::seconds(1));
      group.main_only("a slow write", [] { std::this_thread::sleep_for(std::chrono::seconds(3)); });
      outcome[static_cast<size_t>(r)] = "ok";
      group.main_only("a failing write", [] { fail("disk full"); });
      outcome[static_cast<size_t>(r)] = "no error";
    } catch (const Error& e) {
      outcome[static_cast<size_t>(r)] = e.what();
    }
  };
  std::thread one(rank, 1);
  rank(0);
  one.join();
  EXPECT_EQ(outcome[0], "disk full");
  EXPECT_EQ(outcome[1], "rank 1: rank 0 failed while a failing write: disk full");
}

// A rank that is alive but never comes to a gather through the store is named after the timeout.
TEST(Dist, AGatherThatARankNeverJoinsNamesIt) {
  if (!dist::gloo_available()) GTEST_SKIP() << "no Gloo in this build";
  dist::LaunchEnv env;
  env.world_size = 2;
  env.master_port = unused_port();
  std::string error;
  std::thread one([&] {
    auto e = env;
    e.rank = 1;
    try {
      const auto group = dist::Group::connect(e, std::chrono::seconds(1));
      group.heartbeat(7);
      std::this_thread::sleep_for(std::chrono::seconds(8));  // busy elsewhere, then gone
    } catch (const Error&) {
    }
  });
  try {
    const auto group = dist::Group::connect(env, std::chrono::seconds(1));
    group.all_gather("the data positions", "x");
  } catch (const Error& e) {
    error = e.what();
  }
  one.join();
  EXPECT_NE(error.find("rank 0: the data positions failed: rank 1 (last iteration: 7) of 2 stopped "
                       "responding (no answer within 1 s)"),
            std::string::npos)
      << error;
}

// Under torchrun the agent hosts the store (TORCHELASTIC_USE_AGENT_STORE=True): every rank
// connects to it, under the restart's prefix, instead of rank 0 hosting its own on the same port.
TEST(Dist, RanksJoinTorchrunsAgentStore) {
  const auto dir = test::temp_dir();
  const int port = unused_port();
  c10d::TCPStoreOptions o;
  o.port = static_cast<uint16_t>(port);
  o.isServer = true;
  o.waitWorkers = false;
  const auto agent = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", o);
  const std::string agent_env = "TORCHELASTIC_USE_AGENT_STORE=True TORCHELASTIC_RESTART_COUNT=3 ";
  const std::string args = "distill --recipe " + quick_recipe() + " --out " + dir +
                           "/run --threads 1 --until 2 --dist-timeout 60";
  const auto run = two_ranks(port, args, args, dir + "/rank1.txt", agent_env, agent_env);
  EXPECT_EQ(run.exit_code, 0) << run.output << read_text(dir + "/rank1.txt");
  EXPECT_TRUE(agent->check({"/worker/attempt_3/lightning/joined/1"}));
  EXPECT_EQ(checkpoint_iteration(dir + "/run"), 2);
}

// Start-up faults end every rank at once with the cause, not after the timeout as "stopped
// responding": a rank that never comes is named; a rank that fails its own checks is named with
// its error; ranks that do not share --out find out before training.
TEST(Dist, StartUpFaultsNameTheRankAndTheCause) {
  const auto dir = test::temp_dir();
  const auto started = std::chrono::steady_clock::now();
  auto alone = test::run_command(rank_command(
      0, 2, unused_port(),
      "distill --recipe " + quick_recipe() + " --out " + dir + "/alone --dist-timeout 3"));
  EXPECT_EQ(alone.exit_code, 1) << alone.output;
  EXPECT_NE(alone.output.find("rank 0: rank(s) 1 of 2 did not join"), std::string::npos)
      << alone.output;
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(30));
  // A name that does not resolve is named, with the resolver's reason.
  auto nowhere =
      test::run_command("RANK=1 WORLD_SIZE=2 MASTER_ADDR=no-such-host.invalid MASTER_PORT=29500 " +
                        std::string(LIGHTNING_BIN) + " distill --recipe " + quick_recipe() +
                        " --out " + dir + "/nowhere --dist-timeout 2");
  EXPECT_EQ(nowhere.exit_code, 1) << nowhere.output;
  EXPECT_NE(nowhere.output.find("rank 1: MASTER_ADDR=no-such-host.invalid does not resolve to an "
                                "address within 2 s"),
            std::string::npos)
      << nowhere.output;

  // Rank 1's batch does not split over 2 ranks: rank 0 names rank 1 and its reason.
  auto odd = read_text(quick_recipe());
  const auto at = odd.find("batch_size = 8");
  ASSERT_NE(at, std::string::npos);
  odd.replace(at, 14, "batch_size = 7");
  std::ofstream(dir + "/odd.toml") << odd;
  auto failed =
      two_ranks(unused_port(),
                "distill --recipe " + quick_recipe() + " --out " + dir + "/f --dist-timeout 120",
                "distill --recipe " + dir + "/odd.toml --out " + dir + "/f --dist-timeout 120",
                dir + "/rank1.txt");
  EXPECT_EQ(failed.exit_code, 1) << failed.output;
  EXPECT_NE(failed.output.find("rank 1 failed: "), std::string::npos) << failed.output;
  EXPECT_NE(failed.output.find("batch_size = 7 does not split evenly over 2 ranks"),
            std::string::npos)
      << failed.output;
  // The same fault on rank 0, which hosts the store: it stays until rank 1 has read its error.
  failed = two_ranks(
      unused_port(), "distill --recipe " + dir + "/odd.toml --out " + dir + "/g --dist-timeout 120",
      "distill --recipe " + quick_recipe() + " --out " + dir + "/g --dist-timeout 120",
      dir + "/rank1-g.txt");
  EXPECT_EQ(failed.exit_code, 2) << failed.output;  // its own usage error
  std::string rank1;
  for (int i = 0; i < 100 && rank1.find("lightning: rank 1") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // rank 1 ends after rank 0
    rank1 = read_text(dir + "/rank1-g.txt");
  }
  EXPECT_NE(rank1.find("rank 0 failed: "), std::string::npos) << rank1;
  EXPECT_NE(rank1.find("batch_size = 7 does not split evenly over 2 ranks"), std::string::npos)
      << rank1;

  // The same relative --out from two working directories: two directories, refused.
  fs::create_directories(dir + "/a");
  fs::create_directories(dir + "/b");
  const std::string args = "distill --recipe " + quick_recipe() + " --out run --dist-timeout 10";
  auto apart = two_ranks(unused_port(), args, args, dir + "/apart1.txt", "cd " + dir + "/a && ",
                         "cd " + dir + "/b && ");
  EXPECT_EQ(apart.exit_code, 1) << apart.output;
  EXPECT_NE(apart.output.find("rank 1 failed: "), std::string::npos) << apart.output;
  EXPECT_NE(apart.output.find("--out run does not hold what rank 0 just wrote there"),
            std::string::npos)
      << apart.output;
  EXPECT_FALSE(fs::exists(dir + "/a/run/metrics.jsonl"));
}

// A launcher killed outright (SIGKILL: no chance to pass anything on) takes its ranks along:
// they get SIGTERM from the kernel and stop as on Ctrl-C, instead of training on as orphans.
TEST(Dist, AKilledLauncherTakesItsRanksAlong) {
  const auto dir = test::temp_dir();
  BackgroundJob job(dir, two_rank_run(long_recipe(dir), dir, 30));
  ASSERT_TRUE(job.wait_for_training()) << job.log();
  ASSERT_EQ(::kill(job.leader(), SIGKILL), 0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  auto alive = [](pid_t pid) {  // a zombie (exited, not yet reaped by its new parent) is not
    const auto stat = read_text(fmt::format("/proc/{}/stat", pid));
    const auto state = stat.find(") ");
    return state != std::string::npos && stat.compare(state + 2, 1, "Z") != 0;
  };
  while ((alive(job.rank_pid(0)) || alive(job.rank_pid(1))) &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(alive(job.rank_pid(0))) << job.log();
  EXPECT_FALSE(alive(job.rank_pid(1))) << job.log();
  EXPECT_NE(job.log().find("checkpoint written"), std::string::npos) << job.log();
}
