// UTF-8 validation for user text (prompts): well-formed sequences only, no overlongs, no
// surrogates, nothing above U+10FFFF.
#pragma once

#include <string>

namespace lightning::text {

// True when `s` is well-formed UTF-8; otherwise false and `*bad_offset` (if given) is the byte
// offset of the first bad sequence.
bool is_valid_utf8(const std::string& s, size_t* bad_offset = nullptr);

}  // namespace lightning::text
