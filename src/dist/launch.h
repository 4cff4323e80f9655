// `--nproc N`: N local processes as the ranks of one data-parallel job, started the way
// torchrun --nproc_per_node starts them (see dist/group.h).
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace lightning::dist {

// Runs this program (/proc/self/exe) `nproc` times with `args` (its arguments, without the
// program name), rank i getting RANK=LOCAL_RANK=i, WORLD_SIZE=nproc, MASTER_ADDR=127.0.0.1 and
// MASTER_PORT (from the environment, else a free port). Waits for all of them. When a rank
// fails, the others get `grace` to notice and exit, then get SIGTERM (and SIGCONT, for a
// stopped one), and SIGKILL 10 s later. SIGINT and SIGTERM are passed on to every rank; ranks
// that exit with 130 (interrupted, after a checkpoint) are not failures and start no timer. Returns 0,
// or the exit status of the first rank that failed (128 + signal for a signal), after one line
// naming it.
int launch_local(int nproc, const std::vector<std::string>& args, std::chrono::seconds grace);

}  // namespace lightning::dist
