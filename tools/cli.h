// cli.h — pieces shared by the lancet subcommands.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "trainer/config.h"

namespace lancet::cli {

// The config options every run-like subcommand takes: --config, --set and the short flags.
struct ConfigArgs {
  std::string config_file;
  std::vector<std::string> sets;
  std::vector<std::pair<std::string, std::string>> flags;  // (key, value) in command-line order
};
void add_config_options(CLI::App& app, ConfigArgs& args, bool with_training_flags);
// base <- short flags <- --set overrides (later wins). The base is `defaults` without
// --config, and default_config() merged with the YAML file with it: a config file always
// starts from the documented defaults, never from a subcommand's embedded job.
Json resolve_config(const ConfigArgs& args, Json defaults = default_config());
// The resolved configuration, one line per section.
void print_config(const Json& config, std::ostream& os);

void register_train(CLI::App& app);
void register_eval(CLI::App& app);
void register_forward(CLI::App& app);
void register_synth(CLI::App& app);
void register_bench(CLI::App& app);
void register_prep(CLI::App& app);
void register_sweep(CLI::App& app);
// `lancet bench data` (tools/cmd_bench_data.cpp): adds its options (--workers-list, --batches, ...)
// to the bench subcommand and returns what runs it, given the config options and --json.
std::function<void(const ConfigArgs&, bool json)> add_bench_data(CLI::App& bench);
std::string version_report();

}  // namespace lancet::cli
