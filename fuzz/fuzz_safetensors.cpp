// libFuzzer target for the safetensors header parser (torch-free; see fuzz/README.md).
// Every input must either parse or throw lightning::Error; any other exception, a crash, a hang
// or a sanitizer report is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "core/error.h"
#include "io/safetensors_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto header = lightning::io::parse_safetensors_header(data, size, "fuzz.safetensors");
    // Invariants a successful parse promises to the mmap reader.
    uint64_t covered = 0;
    for (const auto& entry : header.tensors) {
      if (entry.begin != covered || entry.end < entry.begin ||
          entry.end - entry.begin != entry.numel() * lightning::io::dtype_size(entry.dtype))
        std::abort();
      covered = entry.end;
    }
    if (covered != header.data_size || header.data_start + header.data_size != size) std::abort();
  } catch (const lightning::Error&) {
    // Rejected input: the expected outcome for corrupt files.
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
