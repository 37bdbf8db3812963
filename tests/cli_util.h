// cli_util.h — running the lancet binary from tests.
#pragma once
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

namespace lancet::testing {

struct RunResult {
  int status = -1;     // exit status
  std::string output;  // stdout and stderr together
};

inline std::string lancet_binary() { return std::string(LANCET_BINARY_DIR) + "/bin/lancet"; }

// Runs a shell command line, stdout and stderr together.
inline RunResult run_command(const std::string& command) {
  RunResult r;
  const std::string cmd = command + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}
// Runs `env <env> lancet <args>` through the shell; env (NAME=value ...) and args must
// already be quoted where needed.
inline RunResult run_lancet_env(const std::string& env, const std::string& args) {
  return run_command((env.empty() ? "" : "env " + env + " ") + lancet_binary() + " " + args);
}
inline RunResult run_lancet(const std::string& args) { return run_lancet_env("", args); }

// A fresh, empty folder under the test temp dir, removed by the destructor.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name) {
    path = std::filesystem::path(::testing::TempDir()) / ("lancet_" + name + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

}  // namespace lancet::testing
