// lancet train — the serial training loop; with no arguments, the embedded default job.
#include <iostream>

#include "comm/communicator.h"
#include "tools/cli.h"
#include "trainer/trainer.h"

namespace lancet::cli {

void register_train(CLI::App& app) {
  auto* sub = app.add_subcommand("train", "train a model (without --config: the default job, a compact MedicalCNN on synthetic chest X-rays)");
  auto args = std::make_shared<ConfigArgs>();
  add_config_options(*sub, *args, /*with_training_flags=*/true);
  sub->callback([args]() {
    const Json config = resolve_config(*args, default_job_config());
    print_config(config, std::cerr);
    auto comm = make_single_process_communicator();
    run_training(config, *comm, std::cerr);
  });
}

}  // namespace lancet::cli
