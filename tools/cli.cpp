#include "tools/cli.h"

#include <iostream>

namespace lancet::cli {

namespace {
struct Flag {
  const char* name;
  const char* key;
  const char* help;
  bool training;  // only for subcommands that train
};
const Flag kFlags[] = {
    {"--data", "data.dir", "dataset: a folder (class sub-folders or manifest.csv), a .npz or a pack .h5; empty = synthetic default", false},
    {"--image-size", "data.image_size", "input resolution (square)", false},
    {"--channels", "data.channels", "input channels (1 grayscale, 3 RGB)", false},
    {"--bit-depth", "data.bit_depth", "8 | 16: depth images keep up to normalisation (16: grayscale DICOM, 16-bit PNG/TIFF)", false},
    {"--on-bad-sample", "data.on_bad_sample", "error (stop naming the file) | skip (drop unreadable files, listed in the log)", false},
    {"--batch-size", "train.batch_size", "images per step", false},
    {"--device", "train.device", "cpu or cuda[:N]", false},
    {"--threads", "train.threads", "CPU threads (0 = all cores; 1 = serial baseline)", false},
    {"--precision", "train.precision", "fp32 | fp16 | bf16", false},
    {"--memory-format", "train.memory_format", "auto (channels_last for fp16/bf16 on a GPU) | nchw | channels_last", false},
    {"--seed", "train.seed", "seed for initialisation, shuffling and dropout", false},
    {"--out", "train.out", "run folder: final.h5, metrics.jsonl, config.json, checkpoints/", true},
    {"--profile", "train.profile", "write a Chrome trace of step phases and layers to this file", true},
    {"--nsys-steps", "train.nsys_steps", "FIRST:LAST: cudaProfilerStart/Stop around these steps (nsys --capture-range=cudaProfilerApi)", true},
    {"--resume", "train.resume", "continue from a checkpoint: auto (newest valid one in --out) or a path", true},
    {"--epochs", "train.epochs", "training epochs", true},
    {"--max-steps", "train.max_steps", "stop after this many steps (0 = no limit)", true},
    {"--optimizer", "optim.name", "sgd | adam | adamw", true},
    {"--lr", "optim.lr", "learning rate", true},
    {"--weight-decay", "optim.weight_decay", "weight decay (L2 for sgd/adam, decoupled for adamw)", true},
};
}  // namespace

void add_config_options(CLI::App& app, ConfigArgs& args, bool with_training_flags) {
  const Json defaults = default_config();
  std::string sections;  // every section of the config, from its defaults (docs/config.md)
  for (auto it = defaults.begin(); it != defaults.end(); ++it) sections += (sections.empty() ? "" : ", ") + it.key();
  app.add_option("--config", args.config_file, "YAML config file (sections: " + sections + ")")
      ->check(CLI::ExistingFile);
  app.add_option("--set", args.sets, "override any setting: --set section.key=value (repeatable)");
  for (const Flag& f : kFlags) {
    if (f.training && !with_training_flags) continue;
    const std::string key = f.key;
    app.add_option_function<std::string>(
        f.name, [&args, key](const std::string& v) { args.flags.emplace_back(key, v); },
        std::string(f.help) + " (= --set " + key + ")");
  }
  if (with_training_flags)
    app.add_flag_function(
        "--cudnn-autotune", [&args](int64_t) { args.flags.emplace_back("train.cudnn_autotune", "true"); },
        "GPU: benchmark cuDNN's convolution algorithms once per shape, keep the fastest (= --set train.cudnn_autotune=true)");
}

Json resolve_config(const ConfigArgs& args, Json defaults) {
  Json config = args.config_file.empty() ? std::move(defaults) : default_config();
  if (!args.config_file.empty()) merge_config(config, load_yaml_file(args.config_file), "");
  for (const auto& [key, value] : args.flags) apply_override(config, key + "=" + value);
  for (const auto& s : args.sets) apply_override(config, s);
  return config;
}

void print_config(const Json& config, std::ostream& os) {
  os << "config:\n";
  for (auto it = config.begin(); it != config.end(); ++it) os << "  " << it.key() << ": " << it.value().dump() << "\n";
}

}  // namespace lancet::cli
