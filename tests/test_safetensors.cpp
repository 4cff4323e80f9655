// Tests for the safetensors reader/writer: round trips, zero-copy views, strict validation of
// hand-built corrupt files, atomic writes and release().
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/types.h>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace lightning::io {
namespace {

using test::temp_dir;

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[i] = static_cast<char>(value >> (8 * i));
  return out;
}

// A file image exactly as the format describes it: u64 LE header length, header, data.
std::string file_image(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

std::string floats(std::initializer_list<float> values) {
  std::string out(values.size() * sizeof(float), '\0');
  std::memcpy(out.data(), values.begin(), out.size());
  return out;
}

// Writes a corrupt file and checks that opening it throws an Error whose message starts with the
// file name and contains every one of `parts` (a tensor name, a number, a reason).
void expect_rejected(const std::string& bytes, const std::vector<std::string>& parts) {
  const std::string path = temp_dir() + "/corrupt.safetensors";
  write_bytes(path, bytes);
  try {
    SafetensorsFile file(path);
    ADD_FAILURE() << "accepted a corrupt file; expected an error mentioning " << parts[0];
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << message;
    for (const auto& part : parts)
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
  }
}

void expect_header_rejected(const std::string& header, const std::string& data,
                            const std::vector<std::string>& parts) {
  expect_rejected(file_image(header, data), parts);
}

// [begin, end) ranges of /proc/self/maps lines that map `path`.
std::vector<std::pair<uintptr_t, uintptr_t>> mappings_of(const std::string& path) {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  std::ifstream maps("/proc/self/maps");
  const std::string canonical = std::filesystem::canonical(path).string();
  for (std::string line; std::getline(maps, line);) {
    if (line.size() < canonical.size() ||
        line.compare(line.size() - canonical.size(), canonical.size(), canonical) != 0)
      continue;
    uintptr_t begin = 0, end = 0;
    char dash = 0;
    std::istringstream(line) >> std::hex >> begin >> dash >> end;
    ranges.emplace_back(begin, end);
  }
  return ranges;
}

bool inside_mapping_of(const torch::Tensor& tensor, const std::string& path) {
  const auto address = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  for (const auto& [begin, end] : mappings_of(path))
    if (address >= begin && address + tensor.nbytes() <= end) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST(Safetensors, RoundTripsEveryDtypeScalarsEmptyTensorsAndMetadata) {
  const std::string path = temp_dir() + "/all.safetensors";
  torch::manual_seed(0);
  const auto values = torch::randn({3, 5}) * 100;
  const std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"f64", values.to(torch::kDouble)},
      {"f32", values},
      {"f16", values.to(torch::kHalf)},
      {"bf16", values.to(torch::kBFloat16)},
      {"i64", values.to(torch::kLong) * 1000000000},
      {"i32", values.to(torch::kInt)},
      {"i16", values.to(torch::kShort)},
      {"i8", values.clamp(-128, 127).to(torch::kChar)},
      {"u8", values.abs().clamp(0, 255).to(torch::kByte)},
      {"bool", values > 0},
      {"scalar", torch::tensor(3.25)},
      {"scalar_bool", torch::tensor(true)},
      {"empty", torch::empty({0, 4}, torch::kFloat)},
      {"empty_bf16", torch::empty({2, 0}, torch::kBFloat16)},
      {"non_contiguous", values.t()},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"note", "quote \" and ünïcode"}};
  save_safetensors(path, tensors, metadata);

  const SafetensorsFile file(path);
  EXPECT_EQ(file.metadata(), metadata);
  ASSERT_EQ(file.size(), tensors.size());
  std::vector<std::string> expected_keys;
  for (const auto& [name, tensor] : tensors) {
    expected_keys.push_back(name);
    const torch::Tensor loaded = file.get(name);
    EXPECT_EQ(loaded.scalar_type(), tensor.scalar_type()) << name;
    EXPECT_EQ(loaded.sizes(), tensor.sizes()) << name;
    EXPECT_TRUE(torch::equal(loaded, tensor)) << name;
  }
  EXPECT_EQ(file.keys(), expected_keys);  // data order == the order given to save
  EXPECT_EQ(file.entry("scalar").shape, std::vector<int64_t>{});
  EXPECT_EQ(file.entry("empty").end, file.entry("empty").begin);

  const auto all = load_safetensors(path);
  ASSERT_EQ(all.size(), tensors.size());
  EXPECT_TRUE(torch::equal(all.at("bf16"), tensors[3].second));
}

TEST(Safetensors, WritesPaddedHeaderWithMetadataFirstAndKeysInOrder) {
  const std::string path = temp_dir() + "/order.safetensors";
  save_safetensors(path, {{"z", torch::ones({1})}, {"a", torch::ones({2}, torch::kHalf)}},
                   {{"k", "v"}});
  const std::string bytes = read_bytes(path);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i)
    header_size = (header_size << 8) | uint8_t(bytes[i]);
  EXPECT_EQ(header_size % 8, 0u);
  const std::string header = bytes.substr(8, header_size);
  EXPECT_EQ(header.rfind(R"({"__metadata__":{"k":"v"},"z":{"dtype":"F32","shape":[1],)"
                         R"("data_offsets":[0,4]},"a":{"dtype":"F16","shape":[2],)"
                         R"("data_offsets":[4,8]}})",
                         0),
            0u)
      << header;
  EXPECT_EQ(header.find_first_not_of(' ', header.find_last_of('}') + 1), std::string::npos);
  EXPECT_EQ(bytes.size(), 8 + header_size + 8);
}

// A file laid out by hand exactly as the format README describes, as Python's writer emits it.
TEST(Safetensors, ReadsReferenceLayoutByHand) {
  const std::string dir = temp_dir();
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  // Unpadded: the data section starts at 8 + 55, misaligned for F32, so get() copies.
  write_bytes(dir + "/unpadded.safetensors", file_image(header, floats({1.5f, -2.0f})));
  // Padded with spaces to a multiple of 8, as the reference writer does: a zero-copy view.
  const std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  write_bytes(dir + "/padded.safetensors", file_image(padded, floats({1.5f, -2.0f})));
  for (const char* name : {"/unpadded.safetensors", "/padded.safetensors"}) {
    const SafetensorsFile file(dir + name);
    const torch::Tensor a = file.get("a");
    EXPECT_EQ(a.scalar_type(), torch::kFloat);
    EXPECT_EQ(a.sizes(), torch::IntArrayRef({2}));
    EXPECT_EQ(a[0].item<float>(), 1.5f) << name;
    EXPECT_EQ(a[1].item<float>(), -2.0f) << name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data_ptr()) % alignof(float), 0u);
  }
  EXPECT_FALSE(inside_mapping_of(SafetensorsFile(dir + "/unpadded.safetensors").get("a"),
                                 dir + "/unpadded.safetensors"));
}

// ---------------------------------------------------------------------------------------------
// Views

TEST(Safetensors, GetIsAZeroCopyViewAndWritesNeverReachTheFile) {
  const std::string path = temp_dir() + "/view.safetensors";
  save_safetensors(path, {{"w", torch::arange(16, torch::kFloat)}});
  const std::string before = read_bytes(path);
  {
    const SafetensorsFile file(path);
    torch::Tensor first = file.get("w");
    const torch::Tensor second = file.get("w");
    EXPECT_TRUE(inside_mapping_of(first, path));
    EXPECT_EQ(first.data_ptr(), second.data_ptr());  // the same bytes, no copy
    first.fill_(-7);                                 // copy-on-write into private pages
    EXPECT_EQ(second[3].item<float>(), -7.0f);
  }
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_TRUE(torch::equal(SafetensorsFile(path).get("w"), torch::arange(16, torch::kFloat)));
}

TEST(Safetensors, ViewOutlivesTheFileObject) {
  const std::string path = temp_dir() + "/outlive.safetensors";
  save_safetensors(path, {{"w", torch::arange(1000, torch::kLong)}});
  torch::Tensor view;
  {
    auto file = std::make_unique<SafetensorsFile>(path);
    view = file->get("w");
  }
  EXPECT_TRUE(inside_mapping_of(view, path));  // the mapping is still alive
  EXPECT_TRUE(torch::equal(view, torch::arange(1000, torch::kLong)));
  view = torch::Tensor();
  EXPECT_TRUE(mappings_of(path).empty());  // unmapped with the last view
}

TEST(Safetensors, ReleaseKeepsOtherTensorsAndRereadsFromTheFile) {
  const std::string path = temp_dir() + "/release.safetensors";
  // Tensors of many pages each, with a 1-element tensor between them so that boundaries fall
  // mid-page.
  const auto a = torch::arange(50000, torch::kFloat);
  const auto b = torch::arange(70000, torch::kFloat) * 3;
  const auto c = torch::arange(30000, torch::kFloat) - 5;
  save_safetensors(path, {{"a", a}, {"tiny", torch::ones({1})}, {"b", b}, {"c", c}});
  const SafetensorsFile file(path);
  const torch::Tensor view_a = file.get("a");
  const torch::Tensor view_c = file.get("c");
  const torch::Tensor owned_b = file.get("b").clone();  // what a loader does before release()
  file.release("b");
  file.release("tiny");  // no whole page inside: a no-op
  EXPECT_TRUE(torch::equal(view_a, a));
  EXPECT_TRUE(torch::equal(view_c, c));
  EXPECT_TRUE(torch::equal(owned_b, b));
  // Pages of a private file mapping that were never written fault back in from the file.
  EXPECT_TRUE(torch::equal(file.get("b"), b));
  // Pages that were written (private copies) are dropped too: the file's bytes come back.
  file.get("b").fill_(0);
  file.release("b");
  EXPECT_EQ(file.get("b")[40000].item<float>(), 120000.0f);
}

// ---------------------------------------------------------------------------------------------
// Validation: each corrupt file is rejected with a message naming the file and the tensor.

const std::string kOneF32 = floats({1.0f});

TEST(SafetensorsValidation, MissingFileNamesFileAndReason) {
  const std::string path = temp_dir() + "/absent.safetensors";
  try {
    SafetensorsFile file(path);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), path + ": cannot open: No such file or directory");
  }
}

TEST(SafetensorsValidation, EmptyFile) {
  expect_rejected("", {"0 bytes", "too short"});
}

TEST(SafetensorsValidation, FileShorterThanLengthPrefix) {
  expect_rejected(std::string("\x05\0\0", 3), {"3 bytes", "too short"});
}

TEST(SafetensorsValidation, HeaderLengthPastEndOfFile) {
  expect_rejected(le64(1000) + "{}", {"header length 1000", "past the end"});
}

TEST(SafetensorsValidation, HeaderLengthAboveLimit) {
  expect_rejected(le64(kMaxHeaderBytes + 1) + "{}", {"104857601", "limit"});
  expect_rejected(le64(UINT64_MAX) + "{}", {"18446744073709551615", "limit"});
}

TEST(SafetensorsValidation, MalformedJsonReportsParserPosition) {
  expect_header_rejected(R"({"a":{"dtype":"F32",)", "", {"malformed JSON", "line 1, column 21"});
  expect_header_rejected("{\"a\":\"\xff\"}", "", {"malformed JSON", "UTF-8"});
  // nlohmann stops at a NUL as if at the end of input; NUL padding or trailing junk is refused.
  expect_header_rejected(std::string("{}\0\0", 4), "", {"NUL byte at offset 10"});
  expect_header_rejected(std::string("{}\0junk", 7), "", {"NUL byte at offset 10"});
}

TEST(SafetensorsValidation, HeaderNotAnObject) {
  expect_header_rejected("[1, 2]", "", {"not a JSON object"});
  expect_header_rejected(" {}", "", {"not a JSON object"});  // the spec: MUST begin with '{'
}

TEST(SafetensorsValidation, DuplicateKeys) {
  const std::string entry = R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  expect_header_rejected("{\"a\":" + entry + ",\"a\":" + entry + "}", kOneF32,
                         {"duplicate JSON key 'a'"});
  expect_header_rejected(R"({"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                         kOneF32, {"duplicate JSON key 'dtype'"});
}

TEST(SafetensorsValidation, EntryNotAnObject) {
  expect_header_rejected(R"({"conv.weight":[1,2]})", "", {"tensor 'conv.weight'", "object"});
}

TEST(SafetensorsValidation, MissingFields) {
  expect_header_rejected(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", kOneF32,
                         {"tensor 'w'", "missing 'dtype'"});
  expect_header_rejected(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", kOneF32,
                         {"tensor 'w'", "missing 'shape'"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[1]}})", kOneF32,
                         {"tensor 'w'", "missing 'data_offsets'"});
}

TEST(SafetensorsValidation, WronglyTypedFields) {
  expect_header_rejected(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", kOneF32,
                         {"tensor 'w'", "'dtype' must be a string"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", kOneF32,
                         {"tensor 'w'", "'shape' must be an array"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", kOneF32,
                         {"tensor 'w'", "non-negative integers"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":"0,4"}})", kOneF32,
                         {"tensor 'w'", "'data_offsets' must be two"});
}

TEST(SafetensorsValidation, UnknownDtypeIsNamed) {
  expect_header_rejected(R"({"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})",
                         std::string(8, '\0'), {"tensor 'w'", "unknown dtype 'C64'"});
}

TEST(SafetensorsValidation, NegativeDimension) {
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,4]}})", kOneF32,
                         {"tensor 'w'", "negative dimension -1"});
}

TEST(SafetensorsValidation, ShapeOverflow) {
  expect_header_rejected(
      R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", kOneF32,
      {"tensor 'w'", "overflows"});
  // A zero dimension does not excuse an overflowing shape.
  expect_header_rejected(
      R"({"w":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})", "",
      {"tensor 'w'", "overflows"});
  expect_header_rejected(
      R"({"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]}})", "",
      {"tensor 'w'", "too large"});
}

TEST(SafetensorsValidation, DataOffsetsNotTwoNonNegativeIntegers) {
  for (const char* offsets : {"[0]", "[0,4,8]", "[-1,4]", "[0,4.0]", "[0,\"4\"]", "[]"}) {
    expect_header_rejected(
        std::string(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":)") + offsets + "}}", kOneF32,
        {"tensor 'w'", "'data_offsets' must be two"});
  }
}

TEST(SafetensorsValidation, EndBeforeBegin) {
  expect_header_rejected(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}})",
                         std::string(4, '\0'), {"tensor 'w'", "end 0 < begin 4"});
}

TEST(SafetensorsValidation, EndPastDataSection) {
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", kOneF32,
                         {"tensor 'w'", "end 8 is past the end of the 4-byte data section"});
}

TEST(SafetensorsValidation, ByteSizeDiffersFromShape) {
  expect_header_rejected(
      R"({"conv_in.weight":{"dtype":"F32","shape":[3,4,4],"data_offsets":[0,100]}})",
      std::string(100, '\0'),
      {"tensor 'conv_in.weight': byte size 100 != 3*4*4 F32 elements (192 bytes)"});
  expect_header_rejected(R"({"s":{"dtype":"F64","shape":[],"data_offsets":[0,4]}})", kOneF32,
                         {"tensor 's': byte size 4 != 1 F64 elements (8 bytes)"});
}

TEST(SafetensorsValidation, OverlappingRanges) {
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                         std::string(8, '\0'), {"tensor 'b'", "overlaps tensor 'a'"});
  // Two tensors sharing the same bytes.
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                         kOneF32, {"tensor 'b'", "overlaps tensor 'a'"});
}

TEST(SafetensorsValidation, GapBetweenRanges) {
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                         std::string(12, '\0'), {"tensor 'b'", "gap of 4 bytes", "tensor 'a'"});
}

TEST(SafetensorsValidation, FirstRangeNotAtZero) {
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                         std::string(8, '\0'), {"tensor 'a'", "starts at 4, not 0"});
}

TEST(SafetensorsValidation, TrailingBytesAfterLastTensor) {
  // The reference rejects a data section that the tensors do not cover exactly
  // (MetadataIncompleteBuffer).
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                         kOneF32 + "xx", {"data section is 6 bytes", "cover only 4"});
  expect_header_rejected("{}", "x", {"data section is 1 bytes", "cover only 0"});
}

TEST(SafetensorsValidation, MetadataMustBeAnObjectOfStrings) {
  expect_header_rejected(R"({"__metadata__":["a"]})", "", {"'__metadata__' must be an object"});
  expect_header_rejected(R"({"__metadata__":{"epoch":3}})", "",
                         {"'__metadata__' value of 'epoch' must be a string"});
}

TEST(SafetensorsValidation, DeepNestingIsRefused) {
  const std::string deep =
      "{\"__metadata__\":" + std::string(100, '[') + std::string(100, ']') + "}";
  expect_header_rejected(deep, "", {"nested deeper"});
}

TEST(SafetensorsValidation, AbsentTensorIsNamed) {
  const std::string path = temp_dir() + "/one.safetensors";
  save_safetensors(path, {{"a", torch::ones({1})}});
  const SafetensorsFile file(path);
  EXPECT_FALSE(file.contains("b"));
  try {
    file.get("b");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), path + ": no tensor 'b'");
  }
}

// ---------------------------------------------------------------------------------------------
// Atomic writes

std::vector<std::string> directory_listing(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

void expect_save_refused(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                         const std::string& expected) {
  const std::string dir = temp_dir();
  const std::string path = dir + "/model.safetensors";
  save_safetensors(path, {{"old", torch::arange(5, torch::kFloat)}});
  const std::string before = read_bytes(path);
  try {
    save_safetensors(path, tensors);
    ADD_FAILURE() << "save accepted; expected: " << expected;
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), path + ": " + expected);
  }
  EXPECT_EQ(read_bytes(path), before);  // byte-identical
  EXPECT_EQ(directory_listing(dir), std::vector<std::string>{"model.safetensors"});  // no temp
}

TEST(SafetensorsSave, DuplicateNamesLeaveThePreviousFileUntouched) {
  expect_save_refused({{"a", torch::ones({2})}, {"b", torch::ones({2})}, {"a", torch::ones({1})}},
                      "tensor 'a': duplicate name");
}

TEST(SafetensorsSave, UnsupportedDtypeLeavesThePreviousFileUntouched) {
  expect_save_refused({{"a", torch::ones({2})}, {"z", torch::ones({2}, torch::kComplexFloat)}},
                      "tensor 'z': safetensors cannot hold dtype ComplexFloat");
}

TEST(SafetensorsSave, ReservedAndEmptyNamesAreRefused) {
  expect_save_refused({{"__metadata__", torch::ones({2})}},
                      "tensor name '__metadata__' is reserved");
  expect_save_refused({{"", torch::ones({2})}}, "empty tensor name");
}

TEST(SafetensorsSave, UnwritableDirectoryFailsWithReasonAndLeavesNothing) {
  const std::string path = temp_dir() + "/missing_dir/model.safetensors";
  try {
    save_safetensors(path, {{"a", torch::ones({1})}});
    ADD_FAILURE();
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.rfind(path + ": cannot create", 0), 0u) << message;
    EXPECT_NE(message.find("No such file or directory"), std::string::npos) << message;
  }
}

TEST(SafetensorsSave, OverwriteReplacesTheFileAtomically) {
  const std::string dir = temp_dir();
  const std::string path = dir + "/model.safetensors";
  save_safetensors(path, {{"old", torch::ones({100})}});
  const SafetensorsFile old_file(path);  // an open mapping keeps seeing the old inode
  const torch::Tensor old_view = old_file.get("old");
  save_safetensors(path, {{"new", torch::full({3}, 2.0)}});
  EXPECT_TRUE(torch::equal(old_view, torch::ones({100})));
  const SafetensorsFile new_file(path);
  EXPECT_EQ(new_file.keys(), std::vector<std::string>{"new"});
  EXPECT_EQ(directory_listing(dir), std::vector<std::string>{"model.safetensors"});
}

TEST(SafetensorsSave, EmptyFileWithNoTensorsRoundTrips) {
  const std::string path = temp_dir() + "/nothing.safetensors";
  save_safetensors(path, {});
  EXPECT_EQ(read_bytes(path), le64(8) + "{}      ");
  EXPECT_EQ(SafetensorsFile(path).size(), 0u);
}

TEST(SafetensorsDtype, TorchConversionsRoundTrip) {
  for (const DType dtype : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32,
                            DType::I16, DType::I8, DType::U8, DType::BOOL}) {
    EXPECT_EQ(from_torch(to_torch(dtype)), dtype) << dtype_name(dtype);
    EXPECT_EQ(torch::elementSize(to_torch(dtype)), dtype_size(dtype)) << dtype_name(dtype);
    DType parsed;
    ASSERT_TRUE(parse_dtype(dtype_name(dtype), &parsed));
    EXPECT_EQ(parsed, dtype);
  }
  EXPECT_THROW(from_torch(torch::kComplexDouble), Error);
  DType unused;
  EXPECT_FALSE(parse_dtype("f32", &unused));
}

}  // namespace
}  // namespace lightning::io
