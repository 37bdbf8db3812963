// lancet train — training; with no arguments, the embedded default job. Started by mpirun or
// srun with several tasks, every task is a data-parallel rank (dist.* settings).
#include <iostream>

#include "comm/communicator.h"
#include "tools/cli.h"
#include "tools/rank_error.h"
#include "trainer/trainer.h"

namespace lancet::cli {

void register_train(CLI::App& app) {
  auto* sub = app.add_subcommand("train", "train a model (without --config: the default job, a compact MedicalCNN on synthetic chest X-rays); under mpirun/srun with several tasks, data-parallel");
  auto args = std::make_shared<ConfigArgs>();
  add_config_options(*sub, *args, /*with_training_flags=*/true);
  sub->callback([args]() {
    const Json config = resolve_config(*args, default_job_config());
    // NCCL for GPU ranks (bootstrapped over MPI), MPI for CPU ranks, or one process alone.
    auto comm = make_communicator(dist_config(config).backend, train_config(config).device,
                                                  dist_config(config).timeout_s, gpus_per_rank(config));
    // Only rank 0 talks; every rank reports its own errors.
    std::ostream quiet(nullptr);
    std::ostream& log = comm->is_root() ? std::cerr : quiet;
    if (comm->is_root()) print_config(config, std::cerr);
    try {
      run_training(config, *comm, log);
    } catch (const std::exception& e) {
      if (comm->size() == 1) throw;
      // The other ranks cannot know: end the whole job now rather than let them wait.
      report_and_abort_job("train", *comm, e);
      throw;
    }
  });
}

}  // namespace lancet::cli
