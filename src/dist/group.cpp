#include "dist/group.h"

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <future>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

// libtorch's Gloo process group is compiled in when libtorch was built with it (Debian's is,
// with libgloo-dev); its header hides the class unless USE_C10D_GLOO is defined.
#if __has_include(<gloo/algorithm.h>)
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#define LIGHTNING_HAVE_GLOO 1
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
// NCCL: a CUDA libtorch holds ProcessGroupNCCL; CMake defines LIGHTNING_NCCL where nccl.h is
// found. Its header, too, hides the class unless USE_C10D_NCCL is defined.
#ifdef LIGHTNING_NCCL
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL 1
#endif
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/version.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "core/error.h"

namespace lightning::dist {
int int_env(const char* name, int lo, int hi, std::optional<int> fallback) {
  const char* raw = std::getenv(name);
  if (!raw || !*raw) {
    if (fallback) return *fallback;
    fail_usage(
        "{} is not set (WORLD_SIZE is: a distributed launch needs RANK, WORLD_SIZE, "
        "MASTER_ADDR and MASTER_PORT)",
        name);
  }
  char* end = nullptr;
  const long v = std::strtol(raw, &end, 10);
  if (*end != '\0' || v < lo || v > hi)
    fail_usage("{}={} is not an integer in [{}, {}]", name, raw, lo, hi);
  return static_cast<int>(v);
}

namespace {

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

std::string first_line(const std::string& s) {
  return s.substr(0, s.find('\n'));
}

const std::string kPrefix = "lightning/";

// Waiting on the store ended: a peer reported its failure, or the timeout passed.
struct PeerFailed : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct StoreTimeout : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::vector<uint8_t> bytes(const std::string& s) {
  return std::vector<uint8_t>(s.begin(), s.end());
}

std::string text(const std::vector<uint8_t>& v) {
  return std::string(v.begin(), v.end());
}

// torchrun (static rendezvous, or PyTorch >= 2.4 by default) hosts the store in its own agent
// and tells the workers to connect to it, under a prefix per restart, rather than rank 0
// hosting one (which would find the port taken).
bool use_agent_store() {
  const char* v = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  return v && std::string(v) == "True";
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string out;
  for (int r : ranks)
    out += (out.empty() ? "" : ", ") + std::to_string(r);
  return out;
}

}  // namespace

std::optional<LaunchEnv> launch_env_from_environment() {
  const char* world = std::getenv("WORLD_SIZE");
  if (!world || !*world) {
    // As PyTorch's env:// rendezvous: a rank without its job is a launch gone wrong (several
    // hosts writing one run directory as single processes), not a single process.
    if (const char* rank = std::getenv("RANK"); rank && *rank)
      fail_usage(
          "RANK={} is set but WORLD_SIZE is not: a distributed launch needs RANK, WORLD_SIZE, "
          "MASTER_ADDR and MASTER_PORT (unset RANK to train in one process)",
          rank);
    return std::nullopt;
  }
  LaunchEnv env;
  env.world_size = int_env("WORLD_SIZE", 1, 1 << 16);
  env.rank = int_env("RANK", 0, env.world_size - 1);
  env.local_rank = int_env("LOCAL_RANK", 0, env.world_size - 1, env.rank);
  const char* addr = std::getenv("MASTER_ADDR");
  env.master_addr = addr && *addr ? addr : "";
  if (env.master_addr.empty() && env.world_size > 1)
    fail_usage("MASTER_ADDR is not set (the host of rank 0, where the ranks meet)");
  env.master_port = int_env("MASTER_PORT", 1, 65535,
                            env.world_size > 1 ? std::nullopt : std::optional<int>(29500));
  return env;
}

struct Group::Impl {
  int rank = 0, size = 1;
  std::string where;  // MASTER_ADDR:MASTER_PORT
  std::chrono::milliseconds timeout{0};
  c10::Device device = c10::kCPU;
  bool agent_store = false;  // torchrun's agent hosts the store, not rank 0
  c10::intrusive_ptr<c10d::Store> store;
  // Gloo's or NCCL's: since libtorch 2.0 these are c10d::Backends, no longer ProcessGroups.
  // Mutable: a failure drops it (diagnose()).
#if TORCH_VERSION_MAJOR >= 2
  mutable c10::intrusive_ptr<c10d::Backend> pg;
#else
  mutable c10::intrusive_ptr<c10d::ProcessGroup> pg;
#endif
#ifdef LIGHTNING_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;  // = pg on GPUs
#endif
  mutable bool failed = false;  // a collective failed: NCCL's communicators are aborted, not shut
  mutable double waited_s = 0;
  mutable int64_t gathers = 0;  // all_gather calls so far (their store keys)
  mutable int64_t solos = 0;    // main_only calls so far (their store keys)

  // What rank `r` reported when it failed (report_failure), or "". Reading it is acknowledged,
  // so that rank 0, which hosts the store, waits for the others to read its error before it goes.
  std::string failure_of(int r) const {
    const auto key = kPrefix + "failed/" + std::to_string(r);
    if (!store->check({key})) return {};
    store->set(key + "/seen/" + std::to_string(rank), bytes("1"));
    return text(store->get(key));
  }

  // Rank 0 hosts the store (unless torchrun's agent does): before it goes, it waits a few seconds
  // at most until every key of `keys` is set, i.e. until the others have read what it left there
  // (those gone or busy find out from its absence). One request per poll.
  void linger_until_set(const std::vector<std::string>& keys) const {
    if (rank != 0 || agent_store || keys.empty()) return;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!store->check(keys) && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }

  // Whether some rank has reported a failure: one request, whatever the number of ranks.
  bool any_failure() const {
    return store->add(kPrefix + "failures", 0) > 0;
  }

  // The value of `key` once some rank sets it, polling the store: a rank that reports a failure
  // meanwhile ends the wait at once (PeerFailed, naming it); the timeout throws StoreTimeout.
  std::vector<uint8_t> wait_for_key(const std::string& key) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (store->check({key})) return store->get(key);
      if (any_failure())
        for (int r = 0; r < size; ++r)
          if (r != rank)
            if (const auto why = failure_of(r); !why.empty())
              throw PeerFailed(fmt::format("rank {} failed: {}", r, why));
      if (std::chrono::steady_clock::now() > deadline)
        throw StoreTimeout(
            fmt::format("no answer within {:g} s", std::chrono::duration<double>(timeout).count()));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  // Closes this rank's connections of the process group, so that peers blocked in a collective
  // with it fail now (and come to the store to say who is alive) instead of after the timeout.
  // Gloo only; bounded, in case the group's threads are stuck.
  void drop_connections() const {
    if (!device.is_cpu() || !pg) return;
    auto closed = std::make_shared<std::promise<void>>();
    auto done = closed->get_future();
    std::thread([p = std::move(pg), closed]() mutable {
      p.reset();
      closed->set_value();
    }).detach();  // if it is still closing after the wait, it finishes (or ends) on its own
    done.wait_for(std::chrono::seconds(3));
  }

  // Which peers stopped: every rank that is still alive leaves a mark in the store, and those
  // that leave none within a few seconds are named, with the error they reported if they did.
  // If the store itself is gone, rank 0 (its host) is. Rank 0 then keeps the store up until the
  // other survivors have made their own diagnosis (or a few seconds pass).
  std::string diagnose() const {
    drop_connections();
    try {
      store->set(kPrefix + "alive/" + std::to_string(rank), bytes("1"));
      std::vector<int> missing;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
      for (;;) {
        missing.clear();
        for (int r = 0; r < size; ++r)
          if (!store->check({kPrefix + "alive/" + std::to_string(r)})) missing.push_back(r);
        if (missing.empty() || std::chrono::steady_clock::now() > deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      std::string message = "a collective failed on every rank";
      if (!missing.empty()) {
        std::string silent, failed;
        for (int r : missing) {
          if (const auto why = failure_of(r); !why.empty()) {
            failed += fmt::format("{}rank {} failed: {}", failed.empty() ? "" : "; ", r, why);
            continue;
          }
          std::string last = "none";
          const auto key = kPrefix + "step/" + std::to_string(r);
          if (store->check({key})) last = text(store->get(key));
          silent +=
              fmt::format("{}rank {} (last iteration: {})", silent.empty() ? "" : ", ", r, last);
        }
        message = failed;
        if (!silent.empty())
          message += fmt::format("{}{} of {} stopped responding", failed.empty() ? "" : "; ",
                                 silent, size);
      }
      store->set(kPrefix + "diagnosed/" + std::to_string(rank), bytes("1"));
      std::vector<std::string> survivors;  // their diagnosis needs the store
      for (int r = 1; r < size; ++r)
        if (std::find(missing.begin(), missing.end(), r) == missing.end())
          survivors.push_back(kPrefix + "diagnosed/" + std::to_string(r));
      linger_until_set(survivors);
      return message;
    } catch (const std::exception&) {
      return fmt::format("rank 0, which hosts the rendezvous at {}, stopped responding", where);
    }
  }

  // Runs a collective; a failure becomes one line naming the rank that stopped.
  template <typename F>
  void collective(const char* what, F&& f) const {
    if (failed) fail("rank {}: {}: not run, an earlier collective failed", rank, what);
    const auto start = std::chrono::steady_clock::now();
    try {
      f();
      waited_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    } catch (const PeerFailed& e) {  // a peer's reported failure: it says it all
      failed = true;
      drop_connections();
      try {  // alive, for the others' diagnosis
        store->set(kPrefix + "alive/" + std::to_string(rank), bytes("1"));
      } catch (const std::exception&) {
      }
      fail("rank {}: {} failed: {}", rank, what, e.what());
    } catch (const c10::Error& e) {
      failed = true;
      fail("rank {}: {} failed: {} ({})", rank, what, diagnose(),
           first_line(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      failed = true;
      fail("rank {}: {} failed: {} ({})", rank, what, diagnose(), first_line(e.what()));
    }
  }

  // `t` as the process group takes it: on its device, contiguous (itself where it already is).
  at::Tensor on_device(const at::Tensor& t) const {
    return t.detach().to(device).contiguous();
  }

  ~Impl() {
#ifdef LIGHTNING_NCCL
    // NCCL wants its communicators destroyed before exit; after a failure, or while an error
    // unwinds, aborted (a shutdown waits, without a limit, on peers that may not come).
    if (nccl) try {
        if (failed || std::uncaught_exceptions() > 0)
          nccl->abort();
        else
          nccl->shutdown();
      } catch (const std::exception& e) {
        spdlog::debug("dist: NCCL shutdown: {}", first_line(e.what()));
      }
#endif
  }
};

Group::Group() : impl_(std::make_unique<Impl>()) {}
Group::~Group() = default;
Group::Group(Group&&) noexcept = default;
Group& Group::operator=(Group&&) noexcept = default;

bool gloo_available() {
#ifdef LIGHTNING_HAVE_GLOO
  return true;
#else
  return false;
#endif
}

bool nccl_available() {
#ifdef LIGHTNING_NCCL
  return true;
#else
  return false;
#endif
}

Group Group::connect(const LaunchEnv& env, std::chrono::milliseconds timeout,
                     const c10::Device& device) {
  Group group;
  auto& d = *group.impl_;
  d.rank = env.rank;
  d.size = env.world_size;
  d.timeout = timeout;
  d.device = device;
  if (env.world_size == 1) return group;
  // A build without the process group this device needs fails before any rank waits for it.
  if (device.is_cpu() && !gloo_available())
    fail(
        "rank {}: this build has no Gloo (libtorch's CPU process group): rebuild with the gloo "
        "headers (Debian: libgloo-dev) to train on {} processes",
        env.rank, env.world_size);
  if (device.is_cuda() && !nccl_available())
    fail(
        "rank {}: this build has no NCCL (libtorch's GPU process group): rebuild it with "
        "scripts/build-cuda.sh where NCCL's nccl.h is installed to train on {} GPUs",
        env.rank, env.world_size);
  if (!device.is_cpu() && !(device.is_cuda() && device.has_index()))
    fail("rank {}: several ranks train on the CPU or each on one CUDA device, not on {}", env.rank,
         device.str());
  d.where = fmt::format("{}:{}", env.master_addr, env.master_port);
  const auto seconds = std::chrono::duration<double>(timeout).count();
  // The host's name first, quietly, until it resolves (a cluster's name for rank 0 may come up
  // after the workers start): libtorch would log a warning a second for the whole timeout.
  const auto resolve_by = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    addrinfo hints{}, *found = nullptr;
    hints.ai_socktype = SOCK_STREAM;
    const int rc = ::getaddrinfo(env.master_addr.c_str(), nullptr, &hints, &found);
    if (found) ::freeaddrinfo(found);
    if (rc == 0) break;
    if (std::chrono::steady_clock::now() > resolve_by)
      fail("rank {}: MASTER_ADDR={} does not resolve to an address within {:g} s ({})", env.rank,
           env.master_addr, seconds, ::gai_strerror(rc));
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  d.agent_store = use_agent_store();
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(env.master_port);
    o.isServer = env.rank == 0 && !d.agent_store;
    o.numWorkers = env.world_size;
    o.waitWorkers = false;  // the join below names the ranks that do not come
    o.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
    if (d.agent_store) {  // as PyTorch's workers: one key space per restart of the job
      const char* attempt = std::getenv("TORCHELASTIC_RESTART_COUNT");
      tcp = c10::make_intrusive<c10d::PrefixStore>(
          fmt::format("/worker/attempt_{}", attempt && *attempt ? attempt : "0"), tcp);
    }
    d.store = tcp;
  } catch (const std::exception& e) {
    fail(
        "rank {}: no rendezvous with {} ranks at MASTER_ADDR:MASTER_PORT = {} within {:g} s "
        "({})",
        env.rank, env.world_size, d.where, seconds, first_line(e.what()));
  }
  // Every rank checks in; after the timeout the ranks that never came are named.
  try {
    d.store->set(kPrefix + "joined/" + std::to_string(env.rank), bytes("1"));
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::vector<std::string> keys;
    for (int r = 0; r < env.world_size; ++r)
      keys.push_back(kPrefix + "joined/" + std::to_string(r));
    for (;;) {
      if (d.store->check(keys)) break;  // one request for all, whatever the number of ranks
      if (std::chrono::steady_clock::now() > deadline) {
        std::vector<int> missing;
        for (int r = 0; r < env.world_size; ++r)
          if (!d.store->check({keys[static_cast<size_t>(r)]})) missing.push_back(r);
        fail(
            "rank {}: rank(s) {} of {} did not join at MASTER_ADDR:MASTER_PORT = {} within {:g} s "
            "(is every rank started, with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT?)",
            env.rank, rank_list(missing), env.world_size, d.where, seconds);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    fail("rank {}: the rendezvous at {} ended before every rank joined ({})", env.rank, d.where,
         first_line(e.what()));
  }
  if (device.is_cuda()) {
#ifdef LIGHTNING_NCCL
    try {
      c10::cuda::set_device(device.index());
      // Blocking waits: a collective that a peer never joins throws after `timeout` here, so
      // that the error names that peer, instead of NCCL's watchdog aborting the process.
      ::setenv("TORCH_NCCL_BLOCKING_WAIT", "1", /*overwrite=*/0);
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      d.nccl =
          c10::make_intrusive<c10d::ProcessGroupNCCL>(d.store, env.rank, env.world_size, options);
      d.pg = d.nccl;
      d.nccl->eagerConnectSingleDevice(device);  // the communicator now: failures say so here
    } catch (const std::exception& e) {
      fail("rank {}: the NCCL process group over {} on {} did not form ({})", env.rank, d.where,
           device.str(), first_line(e.what()));
    }
#endif
  } else {
#ifdef LIGHTNING_HAVE_GLOO
    try {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      // Loopback jobs stay on loopback; otherwise GLOO_SOCKET_IFNAME picks the interface, as in
      // PyTorch, or the address of this host's name.
      if (is_loopback(env.master_addr)) {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else {
        options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      options->threads = 2;
      d.pg =
          c10::make_intrusive<c10d::ProcessGroupGloo>(d.store, env.rank, env.world_size, options);
    } catch (const std::exception& e) {
      fail("rank {}: the Gloo process group over {} did not form within {:g} s ({})", env.rank,
           d.where, seconds, first_line(e.what()));
    }
#endif
  }
  spdlog::debug("dist: rank {} of {} joined at {}", env.rank, env.world_size, d.where);
  return group;
}

int Group::rank() const {
  return impl_->rank;
}
int Group::size() const {
  return impl_->size;
}
c10::Device Group::device() const {
  return impl_->device;
}
std::chrono::milliseconds Group::timeout() const {
  return impl_->timeout;
}
double Group::collective_seconds() const {
  return impl_->waited_s;
}

void Group::average_gradients(const std::vector<at::Tensor>& params, int64_t bucket_bytes) const {
  if (size() == 1) return;
  std::vector<torch::Tensor> grads;
  for (const auto& p : params) {
    if (!p.grad().defined()) const_cast<torch::Tensor&>(p).mutable_grad() = torch::zeros_like(p);
    grads.push_back(p.grad());
  }
  torch::NoGradGuard no_grad;
  size_t begin = 0;
  while (begin < grads.size()) {
    // A bucket: consecutive gradients of one dtype, up to bucket_bytes (at least one).
    size_t end = begin;
    int64_t bytes = 0;
    while (end < grads.size() && grads[end].scalar_type() == grads[begin].scalar_type() &&
           (end == begin || bytes + grads[end].nbytes() <= static_cast<size_t>(bucket_bytes))) {
      bytes += static_cast<int64_t>(grads[end].nbytes());
      ++end;
    }
    std::vector<torch::Tensor> flat_parts;
    for (size_t k = begin; k < end; ++k)
      flat_parts.push_back(grads[k].reshape({-1}));
    std::vector<torch::Tensor> flat = {impl_->on_device(torch::cat(flat_parts))};
    impl_->collective("gradient all-reduce", [&] { impl_->pg->allreduce(flat)->wait(); });
    flat[0].div_(size());
    int64_t offset = 0;
    for (size_t k = begin; k < end; ++k) {
      const int64_t n = grads[k].numel();
      grads[k].copy_(flat[0].narrow(0, offset, n).view_as(grads[k]));
      offset += n;
    }
    begin = end;
  }
}

void Group::broadcast(const std::vector<at::Tensor>& tensors, int root) const {
  if (size() == 1) return;
  if (root < 0 || root >= size()) fail("broadcast: root rank {} is not in [0, {})", root, size());
  torch::NoGradGuard no_grad;
  c10d::BroadcastOptions options;
  options.rootRank = root;
  for (const auto& t : tensors) {
    std::vector<torch::Tensor> one = {impl_->on_device(t)};
    impl_->collective("broadcast", [&] { impl_->pg->broadcast(one, options)->wait(); });
    if (!one[0].is_alias_of(t)) t.detach().copy_(one[0]);  // it was copied to be broadcast
  }
}

std::vector<double> Group::sum(const std::vector<double>& values) const {
  if (size() == 1 || values.empty()) return values;
  std::vector<torch::Tensor> t = {impl_->on_device(torch::tensor(values, torch::kFloat64))};
  impl_->collective("all-reduce of metrics", [&] { impl_->pg->allreduce(t)->wait(); });
  const auto sums = t[0].cpu();
  const auto* p = sums.data_ptr<double>();
  return std::vector<double>(p, p + values.size());
}

void Group::barrier() const {
  if (size() == 1) return;
  if (impl_->device.is_cpu()) {
    impl_->collective("barrier", [&] { impl_->pg->barrier()->wait(); });
    return;
  }
  // NCCL's barrier guesses its GPU; an all-reduce on ours, waited for by the CPU, is one.
  std::vector<torch::Tensor> one = {torch::zeros({1}, torch::TensorOptions(impl_->device))};
  impl_->collective("barrier", [&] {
    impl_->pg->allreduce(one)->wait();
    one[0].item<float>();
  });
}

std::vector<std::string> Group::all_gather(const std::string& what,
                                           const std::string& value) const {
  if (size() == 1) return {value};
  // Every rank makes the same calls in the same order: a call counter makes the keys unique.
  const auto call = std::to_string(impl_->gathers++);
  const auto key = [&](int r) { return kPrefix + "gather/" + call + "/" + std::to_string(r); };
  std::vector<std::string> values(static_cast<size_t>(size()));
  impl_->collective(what.c_str(), [&] {
    impl_->store->set(key(rank()), bytes(value));
    for (int r = 0; r < size(); ++r)
      values[static_cast<size_t>(r)] = text(impl_->wait_for_key(key(r)));
  });
  return values;
}

void Group::require_same(const std::string& what, const std::string& value) const {
  const auto values = all_gather("start-up check", value);
  for (size_t r = 1; r < values.size(); ++r)
    if (values[r] != values[0])
      fail("{} differ between rank 0 and rank {}: every rank must be started with the same", what,
           r);
}

void Group::main_only(const std::string& what, const std::function<void()>& work) const {
  if (size() == 1) return work();
  auto& d = *impl_;
  const auto done_key = kPrefix + "solo/" + std::to_string(d.solos++);
  const auto beat_key = done_key + "/beat";
  // A beat at least four times per timeout: the others allow a whole timeout without one.
  const auto period = std::clamp<std::chrono::milliseconds>(
      d.timeout / 4, std::chrono::milliseconds(50), std::chrono::milliseconds(1000));
  if (is_main()) {
    std::atomic<bool> done{false};
    std::thread beat([&] {  // signs of life for the others while `work` runs
      for (int64_t k = 1; !done; ++k) {
        try {
          d.store->set(beat_key, bytes(std::to_string(k)));
        } catch (const std::exception&) {
          return;
        }
        for (auto slept = std::chrono::milliseconds(0); slept < period && !done;
             slept += std::chrono::milliseconds(25))
          std::this_thread::sleep_for(std::chrono::milliseconds(25));
      }
    });
    std::exception_ptr error;
    std::string why;
    try {
      work();
    } catch (const std::exception& e) {
      why = e.what();
      error = std::current_exception();
    } catch (...) {
      why = "an unknown exception";
      error = std::current_exception();
    }
    done = true;
    beat.join();
    if (error) {
      report_failure(why);  // the others read it (rank 0 stays until they have)
      std::rethrow_exception(error);
    }
    d.store->set(done_key, bytes("ok"));
    barrier();  // the others have read it: rank 0 may go (and take the store along)
    return;
  }
  // The others wait as long as rank 0 shows signs of life, and the timeout after its last one.
  std::string last;
  auto last_change = std::chrono::steady_clock::now();
  for (;;) {
    bool finished = false;
    std::string failure, seen;
    try {
      finished = d.store->check({done_key});
      if (!finished && d.any_failure()) failure = d.failure_of(0);
      if (!finished && failure.empty() && d.store->check({beat_key}))
        seen = text(d.store->get(beat_key));
    } catch (const std::exception& e) {
      d.failed = true;
      fail("rank {}: rank 0, which hosts the rendezvous at {}, stopped responding while {} ({})",
           rank(), d.where, what, first_line(e.what()));
    }
    if (finished) {
      barrier();
      return;
    }
    if (!failure.empty()) {
      d.failed = true;
      fail("rank {}: rank 0 failed while {}: {}", rank(), what, failure);
    }
    const auto now = std::chrono::steady_clock::now();
    if (seen != last) {
      last = seen;
      last_change = now;
    } else if (now - last_change > d.timeout) {
      d.failed = true;
      fail("rank {}: rank 0 stopped responding while {} (no sign of life for {:g} s)", rank(), what,
           std::chrono::duration<double>(d.timeout).count());
    }
    std::this_thread::sleep_for(period / 2);
  }
}

void Group::report_failure(const std::string& message) const {
  if (size() == 1 || !impl_->store) return;
  auto& d = *impl_;
  const auto key = kPrefix + "failed/" + std::to_string(rank());
  d.failed = true;
  d.drop_connections();  // peers in a collective with this rank come to the store now
  try {
    if (d.store->check({key})) return;  // reported already (main_only, then the caller)
    d.store->set(key, bytes(first_line(message)));
    d.store->add(kPrefix + "failures", 1);
    std::vector<std::string> read;  // failure_of's acknowledgements
    for (int r = 1; r < size(); ++r)
      read.push_back(key + "/seen/" + std::to_string(r));
    d.linger_until_set(read);
  } catch (const std::exception&) {
    // the store is gone: the others find out from rank 0's absence
  }
}

void Group::heartbeat(int64_t step) const {
  if (size() == 1) return;
  const auto s = std::to_string(step);
  impl_->collective("heartbeat", [&] {
    impl_->store->set(kPrefix + "step/" + std::to_string(rank()),
                      std::vector<uint8_t>(s.begin(), s.end()));
  });
}

}  // namespace lightning::dist
