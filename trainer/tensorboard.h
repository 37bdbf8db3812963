// tensorboard.h — scalar summaries in TensorBoard's event-file format, without protobuf.
//
// The file DIR/events.out.tfevents.<unix secs>.<hostname> is a sequence of TFRecords:
//   uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
// (all little-endian), each record one tensorflow.Event message, encoded by hand:
//   Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
//             SessionLog session_log = 7; }        SessionLog { Status status = 1; (START = 1) }
//   Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
// The first record carries file_version "brain.Event:2". `tensorboard --logdir DIR` reads it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>

namespace lancet {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven. `crc` continues a
// previous call's result: crc32c(b, nb, crc32c(a, na)) == crc32c(a+b).
uint32_t crc32c(const void* data, std::size_t n, uint32_t crc = 0);
// TFRecord's mask: rotate right by 15, add 0xa282ead8.
uint32_t masked_crc32c(const void* data, std::size_t n);

class TensorBoardWriter {
 public:
  // Creates `dir` if needed and a new event file in it. flush_every: flush the file after
  // every N scalars (1: every call; the destructor flushes the rest).
  explicit TensorBoardWriter(const std::string& dir, int flush_every = 1);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // Stored as a 32-bit float (TensorBoard's simple_value). wall_time: now when omitted.
  void add_scalar(const std::string& tag, double value, int64_t step);
  void add_scalar(const std::string& tag, double value, int64_t step, double wall_time);
  // A resumed run: SessionLog{status: START} at `step`. TensorBoard then drops the scalars of
  // every earlier file with step >= `step` (steps a crashed run logged after its last
  // checkpoint and the resumed run logs again), as TensorFlow's writers do on restart.
  void add_session_start(int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);
  std::string path_;
  std::ofstream f_;
  int flush_every_;
  int unflushed_ = 0;
};

}  // namespace lancet
