#include "trainer/tensorboard.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "kernels/error.h"

namespace lancet {

namespace fs = std::filesystem;

// ---- CRC-32C ---------------------------------------------------------------------

namespace {

std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}

}  // namespace

uint32_t crc32c(const void* data, std::size_t n, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_crc32c_table();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, std::size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

// ---- protobuf wire format (only what Event needs) ---------------------------------

namespace {

void put_fixed(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFFu);
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7Fu) | 0x80u);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

// Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
void put_key(std::string& out, int field, int wire_type) { put_varint(out, static_cast<uint64_t>(field << 3 | wire_type)); }

void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}

void put_double(std::string& out, int field, double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, 1);
  put_fixed(out, bits, 8);
}

void put_float(std::string& out, int field, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, 5);
  put_fixed(out, bits, 4);
}

double wall_time_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

}  // namespace

// ---- writer ----------------------------------------------------------------------

TensorBoardWriter::TensorBoardWriter(const std::string& dir, int flush_every)
    : flush_every_(flush_every < 1 ? 1 : flush_every) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  LANCET_CHECK(!ec, "TensorBoardWriter: cannot create " << dir << ": " << ec.message());
  const double now = wall_time_now();
  const std::string base = dir + "/events.out.tfevents." + std::to_string(static_cast<int64_t>(now)) + "." + hostname();
  // Two writers started in the same second must not share (and clobber) one file.
  path_ = base;
  for (int i = 1; fs::exists(path_); ++i) path_ = base + "." + std::to_string(i);
  f_.open(path_, std::ios::binary | std::ios::trunc);
  LANCET_CHECK(f_.is_open(), "TensorBoardWriter: cannot create " << path_);

  std::string event;
  put_double(event, 1, now);
  put_bytes(event, 3, "brain.Event:2");
  write_record(event);
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  try {
    f_.flush();
  } catch (...) {
  }
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step) {
  add_scalar(tag, value, step, wall_time_now());
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step, double wall_time) {
  std::string v;
  put_bytes(v, 1, tag);
  put_float(v, 2, static_cast<float>(value));
  std::string summary;
  put_bytes(summary, 1, v);
  std::string event;
  put_double(event, 1, wall_time);
  put_key(event, 2, 0);
  put_varint(event, static_cast<uint64_t>(step));  // int64: two's complement, as protobuf does
  put_bytes(event, 5, summary);
  write_record(event);
  if (++unflushed_ >= flush_every_) flush();
}

void TensorBoardWriter::add_session_start(int64_t step) {
  std::string log;
  put_key(log, 1, 0);
  put_varint(log, 1);  // SessionLog.START
  std::string event;
  put_double(event, 1, wall_time_now());
  put_key(event, 2, 0);
  put_varint(event, static_cast<uint64_t>(step));
  put_bytes(event, 7, log);
  write_record(event);
  flush();
}

void TensorBoardWriter::flush() {
  f_.flush();
  LANCET_CHECK(f_.good(), "TensorBoardWriter: error writing " << path_);
  unflushed_ = 0;
}

void TensorBoardWriter::write_record(const std::string& data) {
  std::string header;
  put_fixed(header, data.size(), 8);
  std::string rec = header;
  put_fixed(rec, masked_crc32c(header.data(), header.size()), 4);
  rec += data;
  put_fixed(rec, masked_crc32c(data.data(), data.size()), 4);
  f_.write(rec.data(), static_cast<std::streamsize>(rec.size()));
  LANCET_CHECK(f_.good(), "TensorBoardWriter: error writing " << path_);
}

}  // namespace lancet
