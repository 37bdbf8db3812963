// lancet sweep — scaling sweeps: runs `lancet bench train` over a grid of configurations
// (device, ranks, threads per rank, precision, batch), each launched with mpirun, or srun
// inside a Slurm allocation, and writes the study-style tables (workers, training time,
// speedup, efficiency), a CSV, a JSON record, and plots (speedup and efficiency against
// workers with the ideal line; the stacked step-phase breakdown) as SVG and PNG. A failed
// configuration is a row marked failed; the sweep goes on. --predict adds the scaling model's
// rows (trainer/scaling.h) beside the measured ones, with its error, and projects to larger
// rank counts on a GPU cluster model.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <thread>

#include "kernels/error.h"
#include "tools/cli.h"
#include "tools/plot.h"
#include "trainer/scaling.h"

namespace lancet::cli {

namespace {
namespace fs = std::filesystem;

struct SweepArgs {
  std::vector<int> ranks{1, 2}, threads{1};
  std::vector<int> stages{1};  // pipeline.stages: 1 (no pipeline), 2
  std::vector<std::string> devices{"cpu"}, precisions{"fp32"};
  std::vector<int64_t> batches{16};
  std::string scaling = "weak";
  std::string mode = "bench";
  std::vector<int> workers;       // data.workers (train mode); empty: the config's
  double target_accuracy = 0;     // train mode: time to this validation accuracy
  int steps = 10, warmup = 3;
  std::string out = "runs/sweep";
  std::string launcher = "auto";
  double timeout_s = 900;
  int64_t epoch_images = 0;
  std::string config_file, image_size;
  std::vector<std::string> sets;
  bool predict = false;
  std::string from;
  std::vector<int> project;
  int ranks_per_node = 8;
  std::string net_intra, net_inter;
};

struct Row {
  std::string device, precision;
  int ranks = 1, threads = 1;
  int workers = -1;  // data.workers; -1: the config's
  int stages = 1;    // pipeline.stages
  int64_t batch = 0, per_rank_batch = 0;
  bool strong = false;  // strong scaling: the global batch is what rows of one group share
  double val_accuracy = NAN, time_to_target_s = NAN;  // train mode
  std::string status = "ok";
  double images_per_s = 0, step_ms = 0, peak_mib = 0, epoch_s = 0;
  std::map<std::string, double> phase_ms;  // forward, backward, grad_sync, optimizer, other
  double speedup = NAN, efficiency = NAN;                // against 1 rank, same threads per rank
  double speedup_serial = NAN, efficiency_serial = NAN;  // against 1 rank x 1 thread
  double predicted_ips = NAN, predicted_err = NAN;
  double predicted_serial_ips = NAN;  // the same model with no overlap (every bucket after the backward)
  Json bench;
  bool ok() const { return status == "ok"; }
  int64_t group_batch() const { return strong || per_rank_batch == 0 ? batch : per_rank_batch; }
  std::string group() const {  // rows that differ only in ranks
    std::ostringstream o;
    o << device << " " << precision << " " << threads << "t " << group_batch();
    if (workers >= 0) o << " w" << workers;
    if (stages > 1) o << " pipe" << stages;
    return o.str();
  }
  std::string series() const {  // plot legend: group() in words
    std::ostringstream o;
    o << device << " " << precision << ", " << threads << " thread" << (threads > 1 ? "s" : "") << "/rank, "
      << (strong ? "global b" : "b") << group_batch();
    if (workers >= 0) o << ", " << workers << " loader worker" << (workers == 1 ? "" : "s");
    if (stages > 1) o << ", pipe" << stages;
    return o.str();
  }
  std::string name() const {
    std::ostringstream o;
    o << ranks << "x" << threads << " " << device << " " << precision << " b" << batch;
    if (workers >= 0) o << " w" << workers;
    if (stages > 1) o << " pipe" << stages;
    return o.str();
  }
};

// pipeline: the overlapped forward + backward of pipelined rows (trainer/pipeline.h).
const char* const kPhases[] = {"forward", "backward", "pipeline", "grad_sync", "optimizer", "other"};

std::string find_in_path(const std::string& exe) {
  const char* path = std::getenv("PATH");
  if (!path) return "";
  std::istringstream ss(path);
  for (std::string dir; std::getline(ss, dir, ':');) {
    if (dir.empty()) continue;
    const fs::path p = fs::path(dir) / exe;
    if (access(p.c_str(), X_OK) == 0) return p.string();
  }
  return "";
}

std::string resolve_launcher(const std::string& wanted) {
  if (wanted != "auto") return wanted;
  if (std::getenv("SLURM_JOB_ID") && !find_in_path("srun").empty()) return "srun";
  if (!find_in_path("mpirun").empty()) return "mpirun";
  return "none";
}

struct ProcResult {
  int exit_code = -1;
  bool timed_out = false;
  std::string describe() const {
    std::ostringstream o;
    if (timed_out) o << "timed out";
    else if (exit_code >= 128) o << "killed by signal " << exit_code - 128;
    else o << "exit " << exit_code;
    return o.str();
  }
};

// Runs argv with stdout and stderr to files, in its own process group so that a timeout ends
// the launcher and every rank it started.
ProcResult run_process(const std::vector<std::string>& argv, const std::string& out_path, const std::string& err_path,
                       double timeout_s) {
  std::vector<char*> cargv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  std::cout.flush();
  std::cerr.flush();
  const pid_t pid = fork();
  LANCET_CHECK(pid >= 0, "sweep: fork failed: " << std::strerror(errno));
  if (pid == 0) {  // only async-signal-safe calls between fork and exec
    setpgid(0, 0);
    const int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const int err = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0 || err < 0 || ::dup2(out, STDOUT_FILENO) < 0 || ::dup2(err, STDERR_FILENO) < 0) _exit(126);
    execvp(cargv[0], cargv.data());
    static const char msg[] = "sweep: cannot run the command (execvp failed)\n";
    if (::write(STDERR_FILENO, msg, sizeof(msg) - 1) < 0) _exit(127);
    _exit(127);
  }
  setpgid(pid, pid);
  ProcResult r;
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  for (;;) {
    const pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > timeout_s) {
      r.timed_out = true;
      kill(-pid, SIGTERM);
      for (int i = 0; i < 50 && waitpid(pid, &status, WNOHANG) == 0; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      kill(-pid, SIGKILL);
      waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status)) r.exit_code = 128 + WTERMSIG(status);
  return r;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The last line of `text` that parses as a JSON object holding `key`.
bool last_json_with(const std::string& text, const char* key, Json& out) {
  std::istringstream ss(text);
  bool found = false;
  for (std::string line; std::getline(ss, line);) {
    if (line.empty() || line[0] != '{') continue;
    try {
      Json j = Json::parse(line);
      if (j.contains(key)) {
        out = std::move(j);
        found = true;
      }
    } catch (const std::exception&) {
    }
  }
  return found;
}

// Where lancet's own error message starts in `line` ("lancet: error: ", "lancet bench: error: ",
// as tools/main.cpp and the per-rank handlers print it); npos if the line holds none. Ranks
// writing at once can interleave on one line, so the last start in the line is taken.
size_t lancet_error_start(const std::string& line) {
  for (size_t p = line.rfind("lancet"); p != std::string::npos; p = p == 0 ? std::string::npos : line.rfind("lancet", p - 1)) {
    size_t q = p + 6;
    if (q < line.size() && line[q] == ' ') q = line.find_first_not_of("abcdefghijklmnopqrstuvwxyz", q + 1);
    if (q != std::string::npos && line.compare(q, 9, ": error: ") == 0) return p;
  }
  return std::string::npos;
}

// A lancet::Error message ends "(<file>:<line>)" (kernels/error.h); one cut short by another
// rank's output does not.
bool ends_with_source_line(const std::string& s) {
  size_t i = s.size();
  while (i > 0 && (s[i - 1] == '\r' || s[i - 1] == ' ')) --i;
  if (i < 3 || s[i - 1] != ')') return false;
  size_t d = i - 1;
  while (d > 0 && std::isdigit(static_cast<unsigned char>(s[d - 1]))) --d;
  return d < i - 1 && d > 0 && s[d - 1] == ':';
}

// Why a run failed, from its log: the last lancet error line, a complete one first (ranks
// writing at once can cut each other's lines); else the last line that is not the launcher's
// own text (Open MPI's help blocks between dashed rules, "[host:pid] ..." ORTE lines, srun's
// and slurmstepd's messages); else the last line. At most 200 characters.
std::string failure_reason(const std::string& log) {
  std::string complete, error, plain, last, line;
  bool in_help = false;  // inside an Open MPI help block ("-----" ... "-----")
  std::istringstream ss(log);
  while (std::getline(ss, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    last = line;
    const size_t e = lancet_error_start(line);
    if (e != std::string::npos) {
      error = line.substr(e);
      if (ends_with_source_line(error)) complete = error;
      continue;
    }
    if (line.find_first_not_of("-\r") == std::string::npos) {
      in_help = !in_help;
      continue;
    }
    const bool launcher = in_help || line[0] == '[' || line.rfind("srun: ", 0) == 0 || line.rfind("slurmstepd", 0) == 0 ||
                          line.rfind("mpirun", 0) == 0;
    if (!launcher) plain = line;
  }
  std::string why = !complete.empty() ? complete : !error.empty() ? error : !plain.empty() ? plain : last;
  while (!why.empty() && (why.back() == '\r' || why.back() == ' ')) why.pop_back();
  if (why.size() > 200) why = why.substr(0, 200) + "...";
  return why;
}

std::vector<std::string> launcher_prefix(const std::string& launcher, int ranks, int threads) {
  if (launcher == "mpirun") {
    // --bind-to none: lancet pins each rank's threads itself (dist.bind auto), threads > 1 included.
    std::vector<std::string> p{"mpirun", "-np", std::to_string(ranks), "--oversubscribe", "--bind-to", "none"};
    if (geteuid() == 0) p.push_back("--allow-run-as-root");
    return p;
  }
  if (launcher == "srun")
    return {"srun", "-n", std::to_string(ranks), "--cpus-per-task", std::to_string(threads), "--mpi=pmix"};
  return {};
}

std::vector<std::string> passthrough(const SweepArgs& a) {
  std::vector<std::string> v;
  if (!a.config_file.empty()) v.insert(v.end(), {"--config", a.config_file});
  if (!a.image_size.empty()) v.insert(v.end(), {"--image-size", a.image_size});
  for (const auto& s : a.sets) v.insert(v.end(), {"--set", s});
  return v;
}

void write_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    LANCET_CHECK(f, tmp << ": cannot write");
    f << text;
    f.close();
    LANCET_CHECK(f, tmp << ": write failed");
  }
  fs::rename(tmp, path);
}

std::string fixed(double v, int prec) {
  if (!std::isfinite(v)) return "-";
  std::ostringstream o;
  o << std::fixed << std::setprecision(prec) << v;
  return o.str();
}

std::string pct(double v) {
  if (!std::isfinite(v)) return "-";
  std::ostringstream o;
  o << std::fixed << std::setprecision(1) << 100 * v << "%";
  return o.str();
}

struct Projection {
  std::string source;
  Cluster cluster;
  std::vector<Prediction> rows;
  int64_t per_rank_batch = 0;
};

std::string markdown(const std::vector<Row>& rows, const SweepArgs& a, int64_t epoch_images, const std::string& launcher,
                     const std::string& link_note, const std::vector<Projection>& projections) {
  std::ostringstream md;
  md << "# lancet sweep\n\n";
  if (a.mode == "train")
    md << "Measured with real `lancet train` runs (the configured data, loader and epochs; throughput over all epochs "
          "throughput = training images / training seconds over all epochs), ";
  else
    md << "Measured with `lancet bench train` (" << a.warmup << " warm-up + " << a.steps << " timed steps, random data), ";
  md << a.scaling << " scaling ("
     << (a.scaling == "weak" ? "the batch is per rank: global batch = ranks x batch"
                             : "the batch is global, split over the ranks")
     << "), launcher " << launcher << ", " << std::thread::hardware_concurrency()
     << " hardware threads. Training time = one epoch of " << epoch_images << " images at the measured rate"
     << (a.mode == "train" ? " (the runs' mean epoch)" : "") << ".\n\n";
  const bool train = a.mode == "train";
  const std::string tta = "time to " + fixed(100 * a.target_accuracy, 1) + "% (s)";
  const bool predicted = std::any_of(rows.begin(), rows.end(), [](const Row& r) { return std::isfinite(r.predicted_ips); });
  // Table 1: rank scaling per group.
  md << "## Data-parallel scaling (speedup and efficiency against 1 rank with the same threads per rank)\n\n";
  std::vector<std::string> groups;
  for (const auto& r : rows)
    if (std::find(groups.begin(), groups.end(), r.group()) == groups.end()) groups.push_back(r.group());
  for (const auto& g : groups) {
    md << "**" << g << "** (device, precision, threads per rank, " << (a.scaling == "weak" ? "batch per rank" : "global batch")
       << ")\n\n"
       << "| ranks | workers (cores) | global batch | img/s | training time (s) | speedup | efficiency |"
       << (predicted ? " predicted img/s | model error | no-overlap bound |" : "")
       << (train ? " val accuracy | " + (a.target_accuracy > 0 ? tta : std::string("-")) + " |" : "") << "\n"
       << "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |" << (predicted ? " ---: | ---: | ---: |" : "")
       << (train ? " ---: | ---: |" : "") << "\n";
    for (const auto& r : rows) {
      if (r.group() != g) continue;
      md << "| " << r.ranks << " | " << r.ranks * r.threads << " | " << r.batch << " | ";
      if (r.ok())
        md << fixed(r.images_per_s, 1) << " | " << fixed(r.epoch_s, 1) << " | " << fixed(r.speedup, 2) << " | "
           << pct(r.efficiency) << " |";
      else
        md << r.status << " | - | - | - |";
      if (predicted)
        md << " " << fixed(r.predicted_ips, 1) << " | " << pct(r.predicted_err) << " | " << fixed(r.predicted_serial_ips, 1)
           << " |";
      if (train) md << " " << fixed(r.val_accuracy, 3) << " | " << fixed(r.time_to_target_s, 1) << " |";
      md << "\n";
    }
    md << "\n";
  }
  // Table 2: serial against parallel.
  md << "## Serial vs parallel (against 1 rank x 1 thread)\n\n"
     << "| configuration | workers (ranks x threads) | img/s | training time (s) | speedup | efficiency |\n"
     << "| --- | ---: | ---: | ---: | ---: | ---: |\n";
  for (const auto& r : rows) {
    md << "| " << r.name() << " | " << r.ranks << " x " << r.threads << " = " << r.ranks * r.threads << " | ";
    if (r.ok())
      md << fixed(r.images_per_s, 1) << " | " << fixed(r.epoch_s, 1) << " | " << fixed(r.speedup_serial, 2) << " | "
         << pct(r.efficiency_serial) << " |\n";
    else
      md << r.status << " | - | - | - |\n";
  }
  // Table 3: where the step's time goes.
  md << "\n## Step phases (mean ms per step; grad_sync = gradient communication not hidden behind the backward)\n\n"
     << "| configuration | forward | backward | pipeline | grad_sync | optimizer | other | step | peak MiB |\n"
     << "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  for (const auto& r : rows) {
    if (!r.ok()) continue;
    md << "| " << r.name();
    for (const char* p : kPhases) md << " | " << fixed(r.phase_ms.count(p) ? r.phase_ms.at(p) : 0, 1);
    md << " | " << fixed(r.step_ms, 1) << " | " << fixed(r.peak_mib, 0) << " |\n";
  }
  if (!link_note.empty()) md << "\n" << link_note << "\n";
  for (const auto& p : projections) {
    md << "\n## Projected (scaling model, trainer/scaling.h) from " << p.source << "\n\n"
       << p.cluster.ranks_per_node << " ranks per node; inside a node " << p.cluster.intra.name << " (alpha "
       << fixed(p.cluster.intra.alpha_s * 1e6, 1) << " us, " << fixed(p.cluster.intra.beta_Bps / 1e9, 1)
       << " GB/s), across nodes " << p.cluster.inter.name << " (alpha " << fixed(p.cluster.inter.alpha_s * 1e6, 1)
       << " us, " << fixed(p.cluster.inter.beta_Bps / 1e9, 1) << " GB/s); batch " << p.per_rank_batch
       << " per rank; compute times as measured.\n\n"
       << "| ranks | nodes | step ms | img/s | speedup | efficiency | all-reduce ms | exposed ms |\n"
       << "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    const double base = p.rows.empty() ? 0 : p.rows.front().images_per_s / std::max(1, p.rows.front().ranks);
    for (const auto& r : p.rows)
      md << "| " << r.ranks << " | " << r.nodes << " | " << fixed(r.step_s * 1e3, 1) << " | " << fixed(r.images_per_s, 1)
         << " | " << fixed(base > 0 ? r.images_per_s / base : NAN, 2) << " | " << pct(r.efficiency) << " | "
         << fixed(r.comm_s * 1e3, 2) << " | " << fixed(r.exposed_s * 1e3, 2) << " |\n";
  }
  return md.str();
}

std::string csv(const std::vector<Row>& rows) {
  std::ostringstream c;
  c << "device,precision,ranks,threads_per_rank,workers,global_batch,per_rank_batch,status,images_per_s,step_ms,"
       "forward_ms,backward_ms,pipeline_ms,grad_sync_ms,optimizer_ms,other_ms,peak_mib,training_time_s,speedup,efficiency,"
       "speedup_vs_serial,efficiency_vs_serial,predicted_images_per_s,model_error,predicted_no_overlap_images_per_s,"
       "data_workers,val_accuracy,time_to_target_s,pipeline_stages\n";
  for (const auto& r : rows) {
    std::string status = r.status;
    std::replace(status.begin(), status.end(), ',', ';');
    std::replace(status.begin(), status.end(), '"', '\'');
    c << r.device << "," << r.precision << "," << r.ranks << "," << r.threads << "," << r.ranks * r.threads << ","
      << r.batch << "," << r.per_rank_batch << ",\"" << status << "\"," << fixed(r.images_per_s, 3) << ","
      << fixed(r.step_ms, 3);
    for (const char* p : kPhases) c << "," << fixed(r.phase_ms.count(p) ? r.phase_ms.at(p) : NAN, 3);
    c << "," << fixed(r.peak_mib, 1) << "," << fixed(r.epoch_s, 3) << "," << fixed(r.speedup, 4) << ","
      << fixed(r.efficiency, 4) << "," << fixed(r.speedup_serial, 4) << "," << fixed(r.efficiency_serial, 4) << ","
      << fixed(r.predicted_ips, 3) << "," << fixed(r.predicted_err, 4) << "," << fixed(r.predicted_serial_ips, 3) << ","
      << (r.workers >= 0 ? std::to_string(r.workers) : std::string("-")) << "," << fixed(r.val_accuracy, 4) << ","
      << fixed(r.time_to_target_s, 3) << "," << r.stages << "\n";
  }
  std::string s = c.str();
  // "-" for missing values reads as text in spreadsheets: leave the cell empty instead.
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '-' && (i == 0 || s[i - 1] == ',') && (i + 1 == s.size() || s[i + 1] == ',' || s[i + 1] == '\n')) continue;
    out += s[i];
  }
  return out;
}

// The plots that could be drawn, as file names under `out` (each chart is written as .svg and
// .png). Speedup and efficiency, one series per group (rows that differ only in ranks), the
// model's predictions dashed, the ideal line: against workers (ranks x threads) and the 1 rank
// x 1 thread run when every series has one, else against ranks and each series' own 1-rank
// run, leaving out a series without one (and the chart when none is left). The step-phase
// bars need no baseline. A chart not drawn removes its files from an earlier sweep into the
// same folder, which would contradict this one's tables.
std::vector<std::string> plots(const std::vector<Row>& rows, const std::string& out) {
  std::vector<std::string> written;
  auto remove_stale = [&](const std::string& base) {
    std::error_code ec;
    for (const char* ext : {".svg", ".png"}) fs::remove(out + "/" + base + ext, ec);
  };
  std::map<std::string, bool> has_serial;  // series -> every ok row has a 1x1 baseline
  for (const auto& r : rows)
    if (r.ok()) {
      auto it = has_serial.emplace(r.series(), true).first;
      it->second = it->second && std::isfinite(r.speedup_serial);
    }
  const bool serial = !has_serial.empty() &&
                      std::all_of(has_serial.begin(), has_serial.end(), [](const auto& kv) { return kv.second; });
  std::map<std::string, Series> measured, predicted;
  double max_x = 1;
  for (const auto& r : rows) {
    const double speedup = serial ? r.speedup_serial : r.speedup;
    if (!r.ok() || !std::isfinite(speedup)) continue;
    const double x = serial ? r.ranks * r.threads : r.ranks;
    const std::string label = r.series();
    Series& s = measured[label];
    s.label = label;
    s.x.push_back(x);
    s.y.push_back(speedup);
    max_x = std::max(max_x, x);
    if (std::isfinite(r.predicted_ips)) {
      Series& p = predicted[label];
      p.label = label + " (model)";
      p.dashed = true;
      p.x.push_back(x);
      p.y.push_back(speedup * r.predicted_ips / r.images_per_s);
    }
  }
  std::vector<std::string> left_out;
  for (const auto& kv : has_serial)
    if (!measured.count(kv.first)) left_out.push_back(kv.first);
  if (measured.empty()) {
    std::cerr << "lancet sweep: no scaling plot: no successful 1-rank run to measure speedup against\n";
    remove_stale("scaling");
  } else {
    if (!left_out.empty()) {
      std::cerr << "lancet sweep: left out of the scaling plot (no successful 1-rank run):";
      for (const auto& l : left_out) std::cerr << " [" << l << "]";
      std::cerr << "\n";
    }
    const std::string xl = serial ? "workers (ranks x threads)" : "ranks";
    LineChart sp{serial ? "Speedup against 1 rank x 1 thread" : "Speedup against 1 rank (same threads per rank)", xl,
                 "speedup", {}};
    LineChart ef{"Parallel efficiency", xl, "efficiency (%)", {}};
    sp.series.push_back(Series{"ideal", {0, max_x}, {0, max_x}, true, -1});
    ef.series.push_back(Series{"ideal", {1, max_x}, {100, 100}, true, -1});
    std::map<std::string, int> colour;  // a prediction takes its measured series' colour
    for (const auto& [label, s] : measured) colour.emplace(label, static_cast<int>(colour.size()));
    for (auto* m : {&measured, &predicted})
      for (auto& [label, s] : *m) {
        std::vector<size_t> order(s.x.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = i;
        std::sort(order.begin(), order.end(), [&](size_t i, size_t j) { return s.x[i] < s.x[j]; });
        Series sorted{s.label, {}, {}, s.dashed, colour[label]}, eff{s.label, {}, {}, s.dashed, colour[label]};
        for (size_t i : order) {
          sorted.x.push_back(s.x[i]);
          sorted.y.push_back(s.y[i]);
          eff.x.push_back(s.x[i]);
          eff.y.push_back(100 * s.y[i] / s.x[i]);
        }
        sp.series.push_back(sorted);
        ef.series.push_back(eff);
      }
    write_line_charts({sp, ef}, out + "/scaling");
    written.push_back("scaling");
  }

  StackedBars bars{"Where a training step's time goes", "ms per step", {}, {}, {}};
  for (const char* p : kPhases) bars.components.push_back(p);
  for (const auto& r : rows) {
    if (!r.ok()) continue;
    bars.bars.push_back(r.name());
    std::vector<double> v;
    for (const char* p : kPhases) v.push_back(r.phase_ms.count(p) ? r.phase_ms.at(p) : 0);
    bars.values.push_back(v);
  }
  if (!bars.bars.empty()) {
    write_stacked_bars(bars, out + "/phases");
    written.push_back("phases");
  } else {
    remove_stale("phases");
  }
  return written;
}

Cluster cluster_from(const SweepArgs& a) {
  Cluster c;
  c.ranks_per_node = a.ranks_per_node;
  if (!a.net_intra.empty()) c.intra = parse_link("--net-intra", a.net_intra);
  if (!a.net_inter.empty()) c.inter = parse_link("--net-inter", a.net_inter);
  return c;
}

Projection project(const MeasuredStep& m, const std::string& source, const SweepArgs& a) {
  Projection p;
  p.source = source;
  p.cluster = cluster_from(a);
  p.per_rank_batch = m.per_rank_batch;
  std::vector<int> ranks = a.project;
  if (std::find(ranks.begin(), ranks.end(), 1) == ranks.end()) ranks.insert(ranks.begin(), 1);
  std::sort(ranks.begin(), ranks.end());
  for (int r : ranks) p.rows.push_back(predict_step(m, r, p.cluster));
  return p;
}

std::vector<std::string> split_csv_line(const std::string& line) {
  std::vector<std::string> out;
  std::string cell;
  std::istringstream ss(line);
  while (std::getline(ss, cell, ',')) out.push_back(cell);
  return out;
}

// Train mode: a finished `lancet train` run folder -> the row's figures. Throughput and
// training time over all epochs (epochs.csv), phases of the last epoch (metrics.jsonl), the
// last validation accuracy and the time until it first reached `target` (0: not asked).
bool read_train_run(const std::string& dir, double target, int64_t& epoch_images, Row& r, std::string& why) {
  std::ifstream csv(dir + "/epochs.csv");
  std::string line;
  if (!csv || !std::getline(csv, line)) {
    why = dir + "/epochs.csv: missing (the run ended before its first epoch)";
    return false;
  }
  const auto header = split_csv_line(line);
  auto col = [&](const char* name) {
    const auto it = std::find(header.begin(), header.end(), name);
    return it == header.end() ? -1 : static_cast<int>(it - header.begin());
  };
  const int c_s = col("epoch_seconds"), c_ips = col("images_per_s"), c_acc = col("val_accuracy");
  if (c_s < 0 || c_ips < 0 || c_acc < 0) {
    why = dir + "/epochs.csv: no epoch_seconds / images_per_s / val_accuracy columns";
    return false;
  }
  double seconds = 0, images = 0;
  int epochs = 0;
  while (std::getline(csv, line)) {
    const auto v = split_csv_line(line);
    if (static_cast<int>(v.size()) <= std::max({c_s, c_ips, c_acc})) continue;
    const double s = std::stod(v[static_cast<size_t>(c_s)]), ips = std::stod(v[static_cast<size_t>(c_ips)]);
    seconds += s;
    images += s * ips;
    ++epochs;
    r.val_accuracy = std::stod(v[static_cast<size_t>(c_acc)]);
    if (target > 0 && !std::isfinite(r.time_to_target_s) && r.val_accuracy >= target) r.time_to_target_s = seconds;
  }
  if (epochs == 0 || seconds <= 0) {
    why = dir + "/epochs.csv: no finished epoch";
    return false;
  }
  r.images_per_s = images / seconds;
  r.epoch_s = seconds / epochs;
  epoch_images = static_cast<int64_t>(std::llround(images / epochs));
  Json last;
  if (last_json_with(read_text(dir + "/metrics.jsonl"), "phases", last)) {
    const Json& ph = last["phases"]["phases"];
    for (const char* p : kPhases)
      if (ph.contains(p)) r.phase_ms[p] = ph[p]["mean_ms"].get<double>();
    if (ph.contains("data_wait")) r.phase_ms["other"] += ph["data_wait"]["mean_ms"].get<double>();
    r.step_ms = last["phases"]["step"]["mean_ms"].get<double>();
  }
  if (last.contains("peak_bytes")) r.peak_mib = last["peak_bytes"].get<double>() / 1048576.0;
  r.per_rank_batch = r.batch / std::max(1, r.ranks);
  return true;
}

void run_sweep(const SweepArgs& a) {
  LANCET_CHECK(a.scaling == "weak" || a.scaling == "strong", "sweep: --scaling must be weak or strong, got " << a.scaling);
  LANCET_CHECK(a.mode == "bench" || a.mode == "train", "sweep: --mode must be bench or train, got " << a.mode);
  LANCET_CHECK(a.workers.empty() || a.mode == "train",
               "sweep: --workers (data.workers) needs --mode train: `bench train` feeds random tensors, no loader");
  LANCET_CHECK(a.target_accuracy == 0 || a.mode == "train", "sweep: --target-accuracy needs --mode train");
  for (int w : a.workers) LANCET_CHECK(w >= 0, "sweep: --workers values must be >= 0, got " << w);
  for (int r : a.ranks) LANCET_CHECK(r >= 1, "sweep: --ranks values must be >= 1, got " << r);
  for (int p : a.stages) LANCET_CHECK(p == 1 || p == 2, "sweep: --pipeline values must be 1 (no pipeline) or 2, got " << p);
  for (int t : a.threads) LANCET_CHECK(t >= 1, "sweep: --threads values must be >= 1, got " << t);
  for (int64_t b : a.batches) LANCET_CHECK(b >= 1, "sweep: --batch-size values must be >= 1, got " << b);
  for (int r : a.project) LANCET_CHECK(r >= 1, "sweep: --project values must be >= 1, got " << r);
  LANCET_CHECK(a.ranks_per_node >= 1, "sweep: --ranks-per-node must be >= 1");
  std::vector<Projection> projections;

  if (!a.from.empty()) {  // prediction only, from a saved `lancet bench train --json` result
    Json j;
    LANCET_CHECK(last_json_with(read_text(a.from), "buckets", j),
                 a.from << ": no `lancet bench train --json` result (a JSON line with buckets) in it");
    auto p = project(MeasuredStep::from_bench_json(j), a.from, a);
    fs::create_directories(a.out);
    const std::string md = markdown({}, a, 0, "-", "", {p});
    write_atomic(a.out + "/prediction.md", md);
    std::cout << md.substr(md.find("## Projected")) << "\nwritten: " << a.out << "/prediction.md\n";
    return;
  }

  const std::string launcher = resolve_launcher(a.launcher);
  LANCET_CHECK(launcher == "mpirun" || launcher == "srun" || launcher == "none",
               "sweep: --launcher must be auto, mpirun, srun or none, got " << a.launcher);
  std::error_code ec;
  const std::string self = fs::read_symlink("/proc/self/exe", ec).string();
  LANCET_CHECK(!ec, "sweep: cannot find the lancet executable (/proc/self/exe): " << ec.message());
  fs::create_directories(a.out + "/runs");
  // Epoch size for the training-time column: the configured synthetic training set unless given.
  int64_t epoch_images = a.epoch_images;
  if (epoch_images <= 0) {
    ConfigArgs ca;
    ca.config_file = a.config_file;
    ca.sets = a.sets;
    epoch_images = data_config(resolve_config(ca)).synth_train;
  }

  std::vector<Row> rows;
  for (const auto& device : a.devices)
    for (const auto& precision : a.precisions)
      for (int64_t batch : a.batches)
        for (int threads : a.threads)
          for (int workers : a.workers.empty() ? std::vector<int>{-1} : a.workers)
          for (int stages : a.stages)
          for (int ranks : a.ranks) {
            Row r;
            r.workers = workers;
            r.stages = stages;
            r.device = device;
            r.precision = precision;
            r.ranks = ranks;
            r.threads = threads;
            r.batch = a.scaling == "weak" ? batch * ranks : batch;
            r.per_rank_batch = a.scaling == "weak" ? batch : (batch % ranks == 0 ? batch / ranks : 0);
            r.strong = a.scaling == "strong";
            rows.push_back(r);
          }
  const int total = static_cast<int>(rows.size());
  const auto pass = passthrough(a);
  for (int i = 0; i < total; ++i) {
    Row& r = rows[static_cast<size_t>(i)];
    std::ostringstream id;
    id << r.device << "_" << r.precision << "_r" << r.ranks << "_t" << r.threads << "_b" << r.batch;
    if (r.workers >= 0) id << "_w" << r.workers;
    if (r.stages > 1) id << "_p" << r.stages;
    std::string file_id = id.str();
    std::replace(file_id.begin(), file_id.end(), ':', '-');
    std::cerr << "[" << i + 1 << "/" << total << "] " << r.name() << ": " << std::flush;
    if (a.scaling == "strong" && r.per_rank_batch == 0) {
      r.status = "failed: batch " + std::to_string(r.batch) + " not divisible by " + std::to_string(r.ranks) + " ranks";
      std::cerr << r.status << "\n";
      continue;
    }
    if (r.stages > 1 && r.ranks > 1 && a.mode == "bench") {
      r.status = "failed: bench mode times a pipeline in one process; --mode train runs pipelines on several ranks";
      std::cerr << r.status << "\n";
      continue;
    }
    if (r.ranks > 1 && launcher == "none") {
      r.status = "failed: no launcher (mpirun or srun) for several ranks";
      std::cerr << r.status << "\n";
      continue;
    }
    std::vector<std::string> argv = r.ranks > 1 || launcher == "srun" ? launcher_prefix(launcher, r.ranks, r.threads)
                                                                      : std::vector<std::string>{};
    const std::string base = a.out + "/runs/" + file_id;
    if (a.mode == "bench") {
      argv.insert(argv.end(), {self, "bench", "train", "--json", "--steps", std::to_string(a.steps), "--warmup",
                               std::to_string(a.warmup)});
    } else {
      std::error_code rm_ec;
      fs::remove_all(base + ".run", rm_ec);  // a fresh run folder (lancet refuses another run's)
      argv.insert(argv.end(), {self, "train", "--out", base + ".run", "--set", "train.tensorboard=false"});
      if (r.workers >= 0) argv.insert(argv.end(), {"--set", "data.workers=" + std::to_string(r.workers)});
    }
    argv.insert(argv.end(), {"--device", r.device, "--precision", r.precision, "--threads", std::to_string(r.threads),
                             "--batch-size", std::to_string(r.batch)});
    if (r.stages > 1) argv.insert(argv.end(), {"--set", "pipeline.stages=" + std::to_string(r.stages)});
    argv.insert(argv.end(), pass.begin(), pass.end());
    {
      std::ofstream cmd(base + ".cmd");
      for (const auto& s : argv) cmd << s << " ";
      cmd << "\n";
    }
    const ProcResult pr = run_process(argv, base + ".json", base + ".log", a.timeout_s);
    Json j;
    if (a.mode == "train") {
      std::string why;
      if (pr.exit_code == 0 && !pr.timed_out && read_train_run(base + ".run", a.target_accuracy, epoch_images, r, why)) {
        std::cerr << fixed(r.images_per_s, 1) << " img/s, val accuracy " << fixed(r.val_accuracy, 3) << "\n";
      } else {
        if (why.empty()) why = failure_reason(read_text(base + ".log"));
        r.status = "failed (" + pr.describe() + (why.empty() ? "" : ": " + why) + ")";
        std::cerr << r.status << "; see " << base << ".log\n";
      }
      continue;
    }
    if (pr.exit_code == 0 && !pr.timed_out && last_json_with(read_text(base + ".json"), "images_per_s", j)) {
      r.bench = j;
      r.images_per_s = j.at("images_per_s").get<double>();
      r.step_ms = j.at("step_ms_mean").get<double>();
      r.peak_mib = j.at("peak_bytes").get<double>() / 1048576.0;
      r.per_rank_batch = j.value("per_rank_batch", r.per_rank_batch);
      r.epoch_s = r.images_per_s > 0 ? epoch_images / r.images_per_s : NAN;
      if (j.contains("profile"))
        for (const char* p : kPhases) r.phase_ms[p] = j["profile"]["phases"][p]["mean_ms"].get<double>();
      if (j.contains("pipeline")) {  // bench mode's pipeline rows: the schedule and the rest
        r.phase_ms["pipeline"] = j["pipeline"]["step_ms"].get<double>();
        r.phase_ms["other"] = std::max(0.0, r.step_ms - r.phase_ms["pipeline"]);
      }
      std::cerr << fixed(r.images_per_s, 1) << " img/s, step " << fixed(r.step_ms, 1) << " ms\n";
    } else {
      const std::string why = failure_reason(read_text(base + ".log"));
      r.status = "failed (" + pr.describe() + (why.empty() ? "" : ": " + why) + ")";
      std::cerr << r.status << "; see " << base << ".log\n";
    }
  }
  // Speedups.
  for (auto& r : rows) {
    if (!r.ok()) continue;
    for (const auto& b : rows)
      if (b.ok() && b.ranks == 1 && b.group() == r.group() && b.images_per_s > 0) {
        r.speedup = r.images_per_s / b.images_per_s;
        r.efficiency = r.speedup / r.ranks;
      }
    for (const auto& b : rows)
      if (b.ok() && b.ranks == 1 && b.threads == 1 && b.device == r.device && b.precision == r.precision &&
          b.group_batch() == r.group_batch() && b.workers == r.workers && b.stages == 1 && b.images_per_s > 0) {
        r.speedup_serial = r.images_per_s / b.images_per_s;
        r.efficiency_serial = r.speedup_serial / (r.ranks * r.threads);
      }
  }

  std::string link_note;
  if (a.predict) {
    // The link between ranks here, measured by `lancet bench comm` with the largest rank count.
    const int rmax = *std::max_element(a.ranks.begin(), a.ranks.end());
    Link link;
    bool have_link = false;
    if (rmax >= 2 && launcher != "none") {
      auto argv = launcher_prefix(launcher, rmax, 1);
      argv.insert(argv.end(), {self, "bench", "comm", "--json", "--steps", "5", "--warmup", "2"});
      std::cerr << "measuring the link between " << rmax << " ranks (lancet bench comm): " << std::flush;
      const ProcResult pr = run_process(argv, a.out + "/runs/comm.json", a.out + "/runs/comm.log", a.timeout_s);
      Json j;
      if (pr.exit_code == 0 && last_json_with(read_text(a.out + "/runs/comm.json"), "fit", j)) {
        link = Link{"measured (lancet bench comm, " + std::to_string(rmax) + " ranks)",
                    j["fit"]["alpha_us"].get<double>() * 1e-6, j["fit"]["beta_GBps"].get<double>() * 1e9};
        have_link = true;
        std::cerr << "alpha " << fixed(link.alpha_s * 1e6, 1) << " us, beta " << fixed(link.beta_Bps / 1e9, 2) << " GB/s\n";
      } else {
        std::cerr << "failed (" << pr.describe() << "); no predictions for this machine\n";
      }
    }
    const double cores = std::max(1u, std::thread::hardware_concurrency());
    double abs_err_sum = 0, abs_err_max = 0;
    int n_err = 0, oversubscribed = 0, n_within = 0;
    for (auto& r : rows) {
      if (!have_link && r.ranks > 1) continue;
      const Row* base = nullptr;
      // The model keeps the measured run's per-rank batch: strong-scaling rows (a smaller one
      // per rank) have no base to predict from.
      for (const auto& b : rows)
        if (b.ok() && b.ranks == 1 && b.group() == r.group() && b.per_rank_batch == r.per_rank_batch &&
            b.bench.contains("buckets"))
          base = &b;
      if (!base) continue;
      // More threads than cores is outside the model: OpenMP's spinning barriers and the
      // scheduler make such runs collapse far beyond the ratio of threads to cores.
      if (r.device == "cpu" && r.ranks * r.threads > cores) {
        ++oversubscribed;
        continue;
      }
      MeasuredStep m = MeasuredStep::from_bench_json(base->bench);
      Cluster here;
      here.ranks_per_node = std::max(1, rmax);  // every rank on this node
      if (have_link) here.intra = link;
      const Prediction p = predict_step(m, r.ranks, here);
      r.predicted_ips = p.images_per_s;
      r.predicted_serial_ips = predict_step(m, r.ranks, here, 1, /*overlap=*/false).images_per_s;
      if (r.ok() && r.ranks > 1) {
        r.predicted_err = (r.predicted_ips - r.images_per_s) / r.images_per_s;
        abs_err_sum += std::fabs(r.predicted_err);
        abs_err_max = std::max(abs_err_max, std::fabs(r.predicted_err));
        if (r.images_per_s >= r.predicted_serial_ips * 0.98 && r.images_per_s <= r.predicted_ips * 1.02) ++n_within;
        ++n_err;
      }
    }
    std::ostringstream note;
    if (have_link)
      note << "Scaling model on this machine: link " << link.name << ": alpha " << fixed(link.alpha_s * 1e6, 1) << " us, beta "
           << fixed(link.beta_Bps / 1e9, 2) << " GB/s. ";
    if (oversubscribed > 0)
      note << oversubscribed << " row(s) with more threads (ranks x threads) than the " << cores
           << " cores are not modelled (oversubscribed CPUs collapse far beyond the thread ratio). ";
    if (n_err > 0)
      note << "Model error over the " << n_err << " multi-rank rows: mean |error| " << pct(abs_err_sum / n_err)
           << ", max " << pct(abs_err_max) << "; " << n_within << " of " << n_err
           << " measured within [no-overlap bound, prediction] (2% margin). On CPUs the transfers and the "
              "reduction run on the cores that compute, so communication overlaps the backward only in part.";
    link_note = note.str();
    if (!a.project.empty())
      for (const auto& b : rows)
        if (b.ok() && b.ranks == 1 && b.bench.contains("buckets")) {
          projections.push_back(project(MeasuredStep::from_bench_json(b.bench), "the measured " + b.name() + " run", a));
          break;
        }
  }

  Json record = Json::array();
  for (const auto& r : rows) {
    Json j = {{"device", r.device}, {"precision", r.precision}, {"ranks", r.ranks}, {"threads", r.threads},
              {"batch", r.batch},   {"status", r.status},       {"bench", r.bench},
              {"images_per_s", r.images_per_s}, {"peak_mib", r.peak_mib}};
    if (r.workers >= 0) j["data_workers"] = r.workers;
    j["pipeline_stages"] = r.stages;
    if (std::isfinite(r.val_accuracy)) j["val_accuracy"] = r.val_accuracy;
    if (std::isfinite(r.time_to_target_s)) j["time_to_target_s"] = r.time_to_target_s;
    if (std::isfinite(r.predicted_ips)) {
      j["predicted_images_per_s"] = r.predicted_ips;
      j["predicted_no_overlap_images_per_s"] = r.predicted_serial_ips;
    }
    record.push_back(j);
  }
  const std::string md = markdown(rows, a, epoch_images, launcher, link_note, projections);
  write_atomic(a.out + "/sweep.md", md);
  write_atomic(a.out + "/sweep.csv", csv(rows));
  write_atomic(a.out + "/sweep.json", record.dump(1) + "\n");
  std::string files = "sweep.md,sweep.csv,sweep.json";
  for (const auto& p : plots(rows, a.out)) files += "," + p + ".svg," + p + ".png";
  std::cout << md << "\nwritten: " << a.out << "/{" << files << "} and runs/ (each configuration's command, output and log)\n";
  const int failed = static_cast<int>(std::count_if(rows.begin(), rows.end(), [](const Row& r) { return !r.ok(); }));
  LANCET_CHECK(failed < total, "sweep: every configuration failed; the first: " << rows.front().status);
  if (failed > 0) std::cerr << "lancet sweep: " << failed << " of " << total << " configurations failed (see the table)\n";
}

}  // namespace

void register_sweep(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "sweep", "scaling sweep: bench a grid of ranks x threads x precision x batch under mpirun/srun; tables, CSV, "
               "plots, and with --predict the scaling model's rows and error");
  auto a = std::make_shared<SweepArgs>();
  sub->add_option("--ranks", a->ranks, "data-parallel ranks, comma-separated")->delimiter(',')->capture_default_str();
  sub->add_option("--threads", a->threads, "threads per rank, comma-separated")->delimiter(',')->capture_default_str();
  sub->add_option("--device", a->devices, "devices (cpu, cuda), comma-separated")->delimiter(',')->capture_default_str();
  sub->add_option("--precision", a->precisions, "precisions (fp32, fp16, bf16), comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--batch-size", a->batches, "batch sizes, comma-separated: per rank (weak scaling) or global (strong)")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--scaling", a->scaling, "weak (batch per rank fixed, as DDP studies run) or strong (global batch fixed)")
      ->check(CLI::IsMember({"weak", "strong"}))
      ->capture_default_str();
  sub->add_option("--mode", a->mode,
                  "bench: `lancet bench train` on random data (throughput, phases, buckets for --predict); train: real "
                  "`lancet train` runs on the configured data (throughput with loading, accuracy, time to "
                  "--target-accuracy)")
      ->check(CLI::IsMember({"bench", "train"}))
      ->capture_default_str();
  sub->add_option("--pipeline", a->stages,
                  "pipeline stages per rank (pipeline.stages), comma-separated: 1 (none), 2; bench mode times "
                  "pipelines in one process (ranks 1), train mode on any rank count")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--workers", a->workers, "train mode: loader worker threads (data.workers), comma-separated")->delimiter(',');
  sub->add_option("--target-accuracy", a->target_accuracy, "train mode: report the time to this validation accuracy")
      ->check(CLI::Range(0.0, 1.0));
  sub->add_option("--steps", a->steps, "timed steps per configuration")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--warmup", a->warmup, "untimed steps first")->check(CLI::NonNegativeNumber)->capture_default_str();
  sub->add_option("--image-size", a->image_size, "input resolution (passed to every run)");
  sub->add_option("--config", a->config_file, "YAML config passed to every run")->check(CLI::ExistingFile);
  sub->add_option("--set", a->sets, "setting passed to every run (repeatable): --set section.key=value");
  sub->add_option("--out", a->out, "folder for sweep.md, sweep.csv, sweep.json, the plots and runs/")->capture_default_str();
  sub->add_option("--launcher", a->launcher, "auto (srun inside a Slurm allocation, else mpirun), mpirun, srun, none")
      ->check(CLI::IsMember({"auto", "mpirun", "srun", "none"}))
      ->capture_default_str();
  sub->add_option("--timeout", a->timeout_s, "seconds before a configuration is stopped and marked failed")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  sub->add_option("--epoch-images", a->epoch_images, "images per epoch for the training-time column (default: data.synth.train)");
  sub->add_flag("--predict", a->predict, "add the scaling model's predictions beside the measured rows, with its error");
  sub->add_option("--from", a->from, "predict only, from a saved `lancet bench train --json` output")->check(CLI::ExistingFile);
  sub->add_option("--project", a->project, "with --predict or --from: rank counts to project to on the cluster model, e.g. 8,16,64")
      ->delimiter(',');
  sub->add_option("--ranks-per-node", a->ranks_per_node, "cluster model: ranks (GPUs) per node")->capture_default_str();
  sub->add_option("--net-intra", a->net_intra, "cluster model, inside a node: ALPHA_US:BETA_GBS (default NVLink 4, 1:360)");
  sub->add_option("--net-inter", a->net_inter, "cluster model, across nodes: ALPHA_US:BETA_GBS (default IB NDR, 5:45)");
  sub->callback([a]() { run_sweep(*a); });
}

}  // namespace lancet::cli
