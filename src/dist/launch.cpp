#include "dist/launch.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "core/error.h"
#include "dist/group.h"

extern char** environ;

namespace lightning::dist {
namespace {

std::vector<pid_t> g_children;  // for the signal handler

extern "C" void pass_on_signal(int sig) {
  for (pid_t pid : g_children)
    if (pid > 0) kill(pid, sig);
}

// A TCP port that is free on the loopback interface now.
int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) fail("--nproc: cannot open a socket to find a free port ({})", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    fail("--nproc: cannot find a free port on 127.0.0.1 ({})", std::strerror(errno));
  }
  close(fd);
  return ntohs(addr.sin_port);
}

std::string describe(int status) {
  if (WIFSIGNALED(status)) return fmt::format("was killed by signal {}", WTERMSIG(status));
  return fmt::format("exited with status {}", WEXITSTATUS(status));
}

// The ranks not yet reaped, as "0, 3".
std::string running_ranks() {
  std::string ranks;
  for (size_t r = 0; r < g_children.size(); ++r)
    if (g_children[r] > 0) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
  return ranks;
}

int exit_code(int status) {
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

}  // namespace

int launch_local(int nproc, const std::vector<std::string>& args, std::chrono::seconds grace) {
  if (nproc < 1) fail_usage("--nproc must be >= 1, got {}", nproc);
  const int port_env = int_env("MASTER_PORT", 1, 65535, /*fallback=*/0);
  const std::string port = std::to_string(port_env ? port_env : free_port());

  // The environment of every rank: ours without the launch variables, plus the rank's.
  std::vector<std::string> base;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const auto name = kv.substr(0, kv.find('='));
    if (name != "RANK" && name != "LOCAL_RANK" && name != "WORLD_SIZE" &&
        name != "LOCAL_WORLD_SIZE" && name != "MASTER_ADDR" && name != "MASTER_PORT")
      base.push_back(kv);
  }
  std::vector<std::string> argv_s = {"lightning"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s)
    argv.push_back(a.data());
  argv.push_back(nullptr);

  g_children.assign(static_cast<size_t>(nproc), -1);
  struct sigaction pass {};
  pass.sa_handler = pass_on_signal;
  sigemptyset(&pass.sa_mask);
  struct sigaction old_int {
  }, old_term{};
  sigaction(SIGINT, &pass, &old_int);
  sigaction(SIGTERM, &pass, &old_term);

  for (int r = 0; r < nproc; ++r) {
    std::vector<std::string> env_s = base;
    env_s.push_back(fmt::format("RANK={}", r));
    env_s.push_back(fmt::format("LOCAL_RANK={}", r));
    env_s.push_back(fmt::format("WORLD_SIZE={}", nproc));
    env_s.push_back(fmt::format("LOCAL_WORLD_SIZE={}", nproc));
    env_s.push_back("MASTER_ADDR=127.0.0.1");
    env_s.push_back("MASTER_PORT=" + port);
    std::vector<char*> envp;
    for (auto& kv : env_s)
      envp.push_back(kv.data());
    envp.push_back(nullptr);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) {
      pass_on_signal(SIGTERM);
      fail("--nproc: cannot start rank {} ({})", r, std::strerror(errno));
    }
    if (pid == 0) {
      // A launcher that dies (even by SIGKILL) takes its ranks along: they get SIGTERM, and
      // stop as on Ctrl-C (one checkpoint), instead of training on as orphans.
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(1);  // it died before prctl
      execve("/proc/self/exe", argv.data(), envp.data());
      std::fprintf(stderr, "lightning: rank %d: cannot run /proc/self/exe (%s)\n", r,
                   std::strerror(errno));
      _exit(127);
    }
    g_children[static_cast<size_t>(r)] = pid;
  }
  std::string pids;
  for (pid_t pid : g_children)
    pids += (pids.empty() ? "" : ", ") + std::to_string(pid);
  spdlog::info("launched {} ranks on 127.0.0.1:{} (pids {})", nproc, port, pids);

  int result = 0, running = nproc;
  std::optional<std::chrono::steady_clock::time_point> failed_at;
  bool terminated = false, killed = false;
  constexpr auto kill_after = std::chrono::seconds(10);
  while (running > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, failed_at ? WNOHANG : 0);
    if (pid < 0 && errno == EINTR) continue;
    if (pid < 0) break;  // no children left
    if (pid == 0) {      // after a failure: waiting for the others, then ending them
      const auto waited = std::chrono::steady_clock::now() - *failed_at;
      if (!terminated && waited > grace) {
        spdlog::warn("rank(s) {} still running {} s after the failure: terminating them (SIGTERM)",
                     running_ranks(),
                     std::chrono::duration_cast<std::chrono::seconds>(grace).count());
        pass_on_signal(SIGTERM);
        pass_on_signal(SIGCONT);  // a stopped rank gets the SIGTERM too
        terminated = true;
      } else if (terminated && !killed && waited > grace + kill_after) {
        spdlog::warn("rank(s) {} still running {} s after SIGTERM: killing them (SIGKILL)",
                     running_ranks(),
                     std::chrono::duration_cast<std::chrono::seconds>(kill_after).count());
        pass_on_signal(SIGKILL);
        killed = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    int rank = -1;
    for (size_t r = 0; r < g_children.size(); ++r)
      if (g_children[r] == pid) {
        rank = static_cast<int>(r);
        g_children[r] = -1;
      }
    if (rank < 0) continue;
    --running;
    const int code = exit_code(status);
    // An interruption (status 130 on every rank, rank 0 last: it writes the checkpoint) is not a
    // failure: the others are waited for without a time limit.
    if (code == 130 && result == 0) result = 130;
    if (code != 0 && code != 130 && (result == 0 || result == 130)) {
      result = code;
      spdlog::error("rank {} (pid {}) {}; waiting up to {} s for the other ranks", rank, pid,
                    describe(status),
                    std::chrono::duration_cast<std::chrono::seconds>(grace).count());
      failed_at = std::chrono::steady_clock::now();
    }
  }
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  g_children.clear();
  return result;
}

}  // namespace lightning::dist
