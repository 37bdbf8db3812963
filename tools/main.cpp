// The `lancet` command-line program.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iostream>

#include "kernels/error.h"
#include "tools/cli.h"

namespace {

// OpenBLAS (Debian 0.3.21) does not recognise Zen 4/5 CPUs and falls back to its AVX2
// kernels, half the speed of its AVX-512 ones there. It reads OPENBLAS_CORETYPE only when
// the library loads, so on an AVX-512 CPU with the variable unset we set it and re-exec
// ourselves once. LANCET_NO_REEXEC=1 (or setting OPENBLAS_CORETYPE yourself) disables this.
void tune_blas_and_reexec(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") || std::getenv("LANCET_NO_REEXEC")) return;
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq"))
    return;
  setenv("OPENBLAS_CORETYPE", "SKYLAKEX", 1);
  setenv("LANCET_NO_REEXEC", "1", 1);
  execv("/proc/self/exe", argv);
  // execv only returns on failure: carry on with the default kernels.
}

}  // namespace

int main(int argc, char** argv) {
  tune_blas_and_reexec(argv);
  CLI::App app{"lancet — train medical-image classifiers on CPUs and GPUs, and see where the time goes"};
  app.require_subcommand(0, 1);
  bool version = false;
  app.add_flag("--version", version, "print the version, what this build has, and the devices it sees");
  lancet::cli::register_train(app);
  lancet::cli::register_eval(app);
  lancet::cli::register_forward(app);
  lancet::cli::register_synth(app);
  lancet::cli::register_bench(app);
  lancet::cli::register_prep(app);
  lancet::cli::register_sweep(app);
  const std::string sub = argc > 1 ? argv[1] : "";
  try {
    app.parse(argc, argv);
    if (version) std::cout << lancet::cli::version_report();
    else if (app.get_subcommands().empty()) std::cout << app.help();
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const lancet::Error& e) {
    std::cerr << "lancet" << (app.get_subcommands().empty() ? "" : " " + app.get_subcommands()[0]->get_name())
              << ": error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "lancet: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
