// Data-parallel training over libtorch's c10d: a TCPStore rendezvous, then a Gloo process group
// for ranks on the CPU or an NCCL one for ranks on GPUs (one GPU per rank, cuda:LOCAL_RANK).
// Processes are started as torchrun starts them, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
// and MASTER_PORT in the environment (or by `--nproc N`, which sets them for N local processes:
// dist/launch.h).
//
// A Group of one process (the default) makes every collective the identity, so training code
// calls them unconditionally. When a peer dies or stops answering, the collective fails within
// the timeout and the error names the rank that stopped (from the heartbeats every rank leaves
// in the store), or the error it reported, instead of hanging. Under torchrun's agent store
// (TORCHELASTIC_USE_AGENT_STORE=True) every rank connects to the agent's store.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>

namespace at {
class Tensor;
}

namespace lightning::dist {

// Where this process sits in a job, from torchrun's variables.
struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};

// An environment variable as an integer in [lo, hi] (`fallback` when it is unset or empty); a
// usage error naming it otherwise.
int int_env(const char* name, int lo, int hi, std::optional<int> fallback = std::nullopt);

// LaunchEnv from the environment; nullopt when WORLD_SIZE is unset (a single process). A
// variable that is missing or malformed while WORLD_SIZE is set: a usage error naming it.
std::optional<LaunchEnv> launch_env_from_environment();

class Group {
 public:
  // A single process.
  Group();
  ~Group();
  Group(Group&&) noexcept;
  Group& operator=(Group&&) noexcept;

  // Joins the job: rank 0 hosts the store at MASTER_ADDR:MASTER_PORT, the others connect to
  // it (an unreachable address fails within `timeout`, naming it); then the process group of
  // `device`: Gloo for the CPU, NCCL for a CUDA device (which becomes the current one).
  // `timeout` also bounds every collective.
  static Group connect(const LaunchEnv& env, std::chrono::milliseconds timeout,
                       const c10::Device& device = c10::kCPU);

  int rank() const;
  int size() const;
  // Where the collectives run: tensors elsewhere are copied there and back.
  c10::Device device() const;
  bool is_main() const { return rank() == 0; }
  // How long a rank waits for the others (the collectives' bound).
  std::chrono::milliseconds timeout() const;

  // Sums, then divides by size(), the gradients of `params` in place, packed into buckets of at
  // most `bucket_bytes` (one all-reduce per bucket). A parameter without a gradient counts as
  // zero and gets one, so that every rank reduces the same buckets.
  void average_gradients(const std::vector<at::Tensor>& params,
                         int64_t bucket_bytes = 25 << 20) const;
  // Copies rank `root`'s values into `tensors` on every rank (in place, same shapes).
  void broadcast(const std::vector<at::Tensor>& tensors, int root = 0) const;
  // The element-wise sum over ranks of a few numbers (metrics, flags).
  std::vector<double> sum(const std::vector<double>& values) const;
  void barrier() const;
  // Fails on every rank when some rank's `value` differs from rank 0's, naming `what` (plural:
  // "the recipe and options") and the rank.
  void require_same(const std::string& what, const std::string& value) const;
  // Every rank's `value`, in rank order, on every rank (through the store: small values only,
  // such as each rank's data position for a checkpoint). `what` names it in errors.
  std::vector<std::string> all_gather(const std::string& what, const std::string& value) const;
  // Seconds this rank has spent in collectives so far (waiting on the others, mostly): what
  // separates a straggler's compute time from everyone's wall time.
  double collective_seconds() const;
  // Records how far this rank got (an iteration), for the error when a peer stops.
  void heartbeat(int64_t step) const;
  // Rank 0 runs `work` alone (a checkpoint, sample images, a stage's model: files) while the
  // others wait for it as long as it shows signs of life: a write of SDXL's size may take longer
  // than the collectives' timeout. They stop when rank 0 goes silent for the timeout, or with
  // its error when `work` fails there. `what` names the work in those errors.
  void main_only(const std::string& what, const std::function<void()>& work) const;
  // Leaves `message` (this rank's fatal error) in the store, so that the others name it rather
  // than a rank that stopped responding. Best effort; call it before exiting on an error.
  void report_failure(const std::string& message) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Whether this build has c10d's process groups for several CPU processes (Gloo) and for
// several GPUs (NCCL: a CUDA libtorch built by scripts/build-cuda.sh where nccl.h is found).
bool gloo_available();
bool nccl_available();

}  // namespace lightning::dist
