// run_log.h — what a run tells its user and leaves in its folder.
//
// ProgressDisplay: one progress line per training step. On a terminal it rewrites the line in
// place ('\r', at most every `min_interval_s`) and ends it at the epoch's last step; in a log
// file (CI, Slurm output) it prints a plain line every `log_every` steps and at each epoch's
// last step:
//   epoch 1/10 step 20/125  loss 0.7144  acc 0.512  lr 1.00e-03  1612.1 img/s  ETA 1m31s
//
// JsonlWriter / CsvWriter: append-only files, one record per line, each line flushed as it is
// written, so a crash loses at most the line being written. A fresh run truncates the file; a
// resumed run appends (a torn last line from a crash is ended first, so new lines stay whole).
// RunLog bundles a run folder's steps.jsonl, metrics.jsonl and epochs.csv.
#pragma once
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iosfwd>
#include <string>
#include <utility>
#include <vector>

#include "trainer/config.h"

namespace lancet {

// "1m31s", "2h05m07s", "42s"; "?" for a negative or non-finite time.
std::string format_duration(double seconds);

struct ProgressInfo {
  int epoch = 0, epochs = 0;        // 1-based epoch of `epochs`
  int64_t step = 0, steps = 0;      // 1-based step within the epoch of `steps`
  double loss = 0, acc = 0, lr = 0;
  double images_per_s = 0;
  double eta_s = 0;                 // seconds left in the run
};

class ProgressDisplay {
 public:
  enum class Tty { detect, yes, no };
  // detect: a terminal when `os` is std::cerr/std::clog and stderr is a TTY, or std::cout and
  // stdout is a TTY; any other stream is not a terminal. log_every <= 0: last step only.
  explicit ProgressDisplay(std::ostream& os, int log_every = 50, Tty tty = Tty::detect, double min_interval_s = 0.1);
  ~ProgressDisplay();  // ends a line left open (a run stopped mid-epoch)
  ProgressDisplay(const ProgressDisplay&) = delete;
  ProgressDisplay& operator=(const ProgressDisplay&) = delete;

  void update(const ProgressInfo& p);
  // Ends the in-place line, if one is open, so other output starts on a fresh line.
  void end_line();
  bool tty() const { return tty_; }

  static std::string format(const ProgressInfo& p);

 private:
  std::ostream& os_;
  int log_every_;
  bool tty_;
  double min_interval_s_;
  bool line_open_ = false;
  std::chrono::steady_clock::time_point last_draw_{};
};

// Opens `path` for writing: truncated (resume == false) or appended (resume == true).
// Throws lancet::Error naming the file when it cannot be opened.
class JsonlWriter {
 public:
  JsonlWriter(const std::string& path, bool resume);
  void write(const Json& record);  // one line, flushed
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream f_;
};

// Columns are fixed by the header: the first row's names (in the caller's order) for a fresh
// file, or the existing header line when appending to a non-empty file. A later row may omit
// columns (empty cells); a name not in the header is an error.
class CsvWriter {
 public:
  using Row = std::vector<std::pair<std::string, double>>;
  CsvWriter(const std::string& path, bool resume);
  void write_row(const Row& row);  // flushed
  const std::vector<std::string>& columns() const { return columns_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream f_;
  std::vector<std::string> columns_;  // empty until the header is known
};

// A run folder's logs: DIR/steps.jsonl (one object per logged step), DIR/metrics.jsonl (one
// object per epoch), DIR/epochs.csv (one row of scalars per epoch). Creates DIR.
struct RunLog {
  RunLog(const std::string& dir, bool resume);
  JsonlWriter steps;
  JsonlWriter metrics;
  CsvWriter epochs;
};

}  // namespace lancet
