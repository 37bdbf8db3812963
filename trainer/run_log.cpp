#include "trainer/run_log.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "kernels/error.h"

namespace lancet {

namespace fs = std::filesystem;

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  std::ostringstream os;
  if (t >= 3600) os << t / 3600 << "h";
  os << std::setfill('0');
  if (t >= 60) os << std::setw(t >= 3600 ? 2 : 1) << (t / 60) % 60 << "m";
  os << std::setw(t >= 60 ? 2 : 1) << t % 60 << "s";
  return os.str();
}

// ---- progress ----------------------------------------------------------------

namespace {

bool detect_tty(const std::ostream& os) {
  if (&os == &std::cerr || &os == &std::clog) return isatty(STDERR_FILENO) == 1;
  if (&os == &std::cout) return isatty(STDOUT_FILENO) == 1;
  return false;
}

}  // namespace

ProgressDisplay::ProgressDisplay(std::ostream& os, int log_every, Tty tty, double min_interval_s)
    : os_(os),
      log_every_(log_every),
      tty_(tty == Tty::detect ? detect_tty(os) : tty == Tty::yes),
      min_interval_s_(min_interval_s) {}

ProgressDisplay::~ProgressDisplay() {
  try {
    end_line();
  } catch (...) {
    // a stream that throws on write: nothing more to show
  }
}

std::string ProgressDisplay::format(const ProgressInfo& p) {
  std::ostringstream line;
  line << "epoch " << p.epoch << "/" << p.epochs << " step " << p.step << "/" << p.steps << std::fixed
       << std::setprecision(4) << "  loss " << p.loss << std::setprecision(3) << "  acc " << p.acc
       << std::scientific << std::setprecision(2) << "  lr " << p.lr << std::fixed << std::setprecision(1) << "  "
       << p.images_per_s << " img/s  ETA " << format_duration(p.eta_s);
  return line.str();
}

void ProgressDisplay::update(const ProgressInfo& p) {
  const bool last = p.step >= p.steps;
  if (!tty_) {
    if (last || (log_every_ > 0 && p.step % log_every_ == 0)) os_ << format(p) << "\n" << std::flush;
    return;
  }
  const auto now = std::chrono::steady_clock::now();
  // The first line of an epoch and the last are always drawn; in between, at most one redraw
  // per min_interval_s keeps a fast loop from spending its time on the terminal.
  if (line_open_ && !last && std::chrono::duration<double>(now - last_draw_).count() < min_interval_s_) return;
  last_draw_ = now;
  os_ << "\r" << format(p) << "\033[K";
  if (last) {
    os_ << "\n";
    line_open_ = false;
  } else {
    line_open_ = true;
  }
  os_ << std::flush;
}

void ProgressDisplay::end_line() {
  if (!line_open_) return;
  os_ << "\n" << std::flush;
  line_open_ = false;
}

// ---- append-only files ---------------------------------------------------------

namespace {

// Opens for a fresh run (truncate) or a resumed one (append; a torn last line left by a crash
// is ended first so the next record starts on its own line).
std::ofstream open_log(const std::string& path, bool resume) {
  bool torn = false;
  if (resume) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (in && in.tellg() > 0) {
      in.seekg(-1, std::ios::end);
      torn = in.get() != '\n';
    }
  }
  std::ofstream f(path, resume ? std::ios::app : std::ios::trunc);
  LANCET_CHECK(f.is_open(), "cannot open log file " << path << " for writing");
  if (torn) f << "\n";
  return f;
}

void write_line(std::ofstream& f, const std::string& path, const std::string& line) {
  f << line << "\n";
  f.flush();
  LANCET_CHECK(f.good(), "error writing log file " << path);
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string q = "\"";
  for (const char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

// Splits a header line written by csv_field (quoted fields may hold commas and "").
std::vector<std::string> parse_csv_header(const std::string& line) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        out.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        out.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.emplace_back();
    } else if (c != '\r') {
      out.back() += c;
    }
  }
  return out;
}

}  // namespace

JsonlWriter::JsonlWriter(const std::string& path, bool resume) : path_(path), f_(open_log(path, resume)) {}

void JsonlWriter::write(const Json& record) { write_line(f_, path_, record.dump()); }

CsvWriter::CsvWriter(const std::string& path, bool resume) : path_(path) {
  if (resume) {
    std::ifstream in(path);
    std::string header;
    if (in && std::getline(in, header) && !header.empty()) columns_ = parse_csv_header(header);
  }
  f_ = open_log(path, resume);
}

void CsvWriter::write_row(const Row& row) {
  LANCET_CHECK(!row.empty(), "CsvWriter: empty row for " << path_);
  if (columns_.empty()) {
    std::string header;
    for (const auto& c : row) {
      for (const auto& seen : columns_)
        LANCET_CHECK(seen != c.first, "CsvWriter: column '" << c.first << "' given twice for " << path_);
      columns_.push_back(c.first);
      header += (header.empty() ? "" : ",") + csv_field(c.first);
    }
    write_line(f_, path_, header);
  }
  std::vector<std::string> cells(columns_.size());
  for (const auto& c : row) {
    std::size_t i = 0;
    while (i < columns_.size() && columns_[i] != c.first) ++i;
    LANCET_CHECK(i < columns_.size(), "CsvWriter: column '" << c.first << "' is not in the header of " << path_);
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.10g", c.second);
    cells[i] = buf;
  }
  std::string line;
  for (std::size_t i = 0; i < cells.size(); ++i) line += (i ? "," : "") + cells[i];
  write_line(f_, path_, line);
}

namespace {
const std::string& make_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  LANCET_CHECK(!ec, "cannot create run folder " << dir << ": " << ec.message());
  return dir;
}
}  // namespace

RunLog::RunLog(const std::string& dir, bool resume)
    : steps(make_dir(dir) + "/steps.jsonl", resume), metrics(dir + "/metrics.jsonl", resume),
      epochs(dir + "/epochs.csv", resume) {}

}  // namespace lancet
