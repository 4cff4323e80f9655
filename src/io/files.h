// Whole files read; whole directories written atomically: build the new contents in a temporary
// sibling, then swap it in, so a reader (or a crash) never sees a half-written model or checkpoint
// and an existing directory is replaced only once its successor is complete.
#pragma once

#include <functional>
#include <string>

namespace lightning::io {

// Calls `fill(tmp)` with an empty temporary directory beside `target`, then renames it to
// `target` (the previous `target`, if any, is removed after the rename). If `fill` throws, the
// temporary directory is removed and `target` is untouched.
void write_directory_atomic(const std::string& target,
                            const std::function<void(const std::string& tmp)>& fill);

// Refuses, naming it, an existing `dir` that is neither empty nor holds the file `marker` (such
// as "model_index.json"): an output replaces an earlier output of its kind, never a directory of
// something else (a user's data).
void check_replaceable(const std::string& dir, const char* marker);

// Reads the whole file into `bytes`. False when it cannot be opened or read (errno says why).
bool read_file_bytes(const std::string& path, std::string* bytes);

}  // namespace lightning::io
