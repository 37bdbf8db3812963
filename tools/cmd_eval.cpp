// lancet eval — evaluate a weights file on a dataset split and print (and save) the clinical
// report: accuracy, per-class precision / sensitivity / specificity / F1, AUROC, confusion
// matrix, and for binary tasks a decision threshold and an operating point at a target sensitivity.
//
// The images are preprocessed as the training run did: the data settings that decide a model's
// input pixels default to the run's configuration saved in the weights file (weights.h,
// read_run_config), not to lancet's defaults.
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "data/h5file.h"
#include "data/image_dataset.h"
#include "data/preprocess.h"
#include "kernels/parallel.h"
#include "tools/cli.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

namespace lancet::cli {

namespace {

// Writes `path` through a temporary file and a rename, so a reader never sees half a file.
void write_atomically(const std::string& path, const std::function<void(std::ostream&)>& write) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    LANCET_CHECK(f.is_open(), "cannot open " << tmp << " for writing");
    write(f);
    f.flush();
    LANCET_CHECK(f.good(), "cannot write " << tmp);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  LANCET_CHECK(!ec, "cannot rename " << tmp << " to " << path << ": " << ec.message());
}

// The data settings besides data.channels that decide the pixels a model sees: how a DICOM is
// windowed, the recipe, the resize and the normalisation; and data.classes, which decides which
// output a label is (a run that declared its class order must be evaluated in that order).
// data.channels is the model's in_channels, which the weights hold.
const char* const kPixelSettings[] = {"data.dicom.window", "data.preprocess", "data.image_size", "data.bit_depth",
                                      "data.mean", "data.std", "data.classes"};

Json::json_pointer setting_pointer(const std::string& key) {  // "data.dicom.window" -> /data/dicom/window
  std::string p = "/" + key;
  for (char& c : p)
    if (c == '.') c = '/';
  return Json::json_pointer(p);
}

void add_leaves(const Json& tree, const std::string& prefix, std::vector<std::string>& out) {
  if (!tree.is_object() || tree.empty()) {
    if (!prefix.empty()) out.push_back(prefix);
    return;
  }
  for (auto it = tree.begin(); it != tree.end(); ++it)
    add_leaves(it.value(), prefix.empty() ? it.key() : prefix + "." + it.key(), out);
}

// The settings this command line gives: --config's leaves, the short flags' and --set's keys.
std::vector<std::string> given_settings(const ConfigArgs& args) {
  std::vector<std::string> keys;
  if (!args.config_file.empty()) add_leaves(load_yaml_file(args.config_file), "", keys);
  for (const auto& [key, value] : args.flags) keys.push_back(key);
  for (const std::string& s : args.sets) keys.push_back(s.substr(0, s.find('=')));
  return keys;
}

// Whether `key` is given, itself or inside a section given whole (--set data.dicom={...}).
bool is_given(const std::vector<std::string>& given, const std::string& key) {
  for (const std::string& g : given)
    if (g == key || key.rfind(g + ".", 0) == 0) return true;
  return false;
}

// Recipes compare by what they do, not by how they spell their defaults.
bool same_setting(const std::string& key, const Json& trained, const Json& given, const std::string& weights) {
  if (key != "data.preprocess") return trained == given;
  return PreprocessRecipe::from_json(trained, weights + ": trained data.preprocess").fingerprint() ==
         PreprocessRecipe::from_json(given).fingerprint();
}

// Sets every pixel setting that the command line does not give to the training run's value
// saved in `weights`; a given one that differs is kept and logged (key, trained and given
// value). Without a saved configuration nothing changes and the log says so.
void apply_training_recipe(Json& config, const ConfigArgs& args, const std::string& weights, std::ostream& log) {
  const std::optional<Json> trained = read_run_config(H5File::open_read(weights));
  if (!trained) {
    log << "eval: no training recipe in " << weights
        << " (no /train config, e.g. a PyTorch export): data settings as given here, else lancet's defaults\n";
    return;
  }
  const std::vector<std::string> given = given_settings(args);
  std::string taken;
  for (const char* key : kPixelSettings) {
    const Json::json_pointer p = setting_pointer(key);
    if (!trained->contains(p)) continue;  // a run from before the setting existed: keep this one
    const Json& was = trained->at(p);
    if (!is_given(given, key)) {
      config[p] = was;
      taken += std::string(taken.empty() ? "" : ", ") + key + " " + was.dump();
    } else if (!same_setting(key, was, config.at(p), weights)) {
      log << "eval: " << key << " " << config.at(p).dump() << " given, but the model was trained with "
          << was.dump() << ": using " << config.at(p).dump() << "\n";
    }
  }
  log << "eval: preprocessing as in training (" << weights << "): "
      << (taken.empty() ? "every setting of its recipe given here" : taken) << "\n";
}

}  // namespace

void register_eval(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "eval", "evaluate weights on a dataset split: accuracy, per-class precision/recall/specificity/F1, AUROC");
  struct Args {
    ConfigArgs config;
    std::string weights, split = "val", report, predictions;
    std::optional<double> threshold, target_sensitivity;
  };
  auto a = std::make_shared<Args>();
  sub->add_option("--weights", a->weights, "weights file (interchange HDF5)")->required()->check(CLI::ExistingFile);
  sub->add_option("--split", a->split, "split to evaluate (manifest split or sub-folder; '' = every row of a manifest without a split column, or a folder of class folders)");
  sub->add_option("--report", a->report, "also write the full report as JSON to this file");
  sub->add_option("--predictions", a->predictions,
                  "write per-sample rows (index,source,label,predicted,prob_<class>...; source: the file, for a pack the file it was packed from) as CSV to this file");
  sub->add_option("--threshold", a->threshold, "binary tasks: predict class 1 when P(class 1) >= T (default 0.5)");
  sub->add_option("--target-sensitivity", a->target_sensitivity,
                  "binary tasks: also report the largest threshold reaching this sensitivity, in (0, 1]");
  add_config_options(*sub, a->config, /*with_training_flags=*/false);
  sub->callback([a]() {
    Json config = resolve_config(a->config);
    apply_training_recipe(config, a->config, a->weights, std::cerr);
    DataConfig dc = data_config(config);
    const TrainConfig tc = train_config(config);
    set_num_threads(tc.threads > 0 ? tc.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    // --device and --precision as in lancet train and forward: fp16/bf16 emulated on the CPU,
    // 16-bit tensors on a GPU (layers/module.h); the report is computed from FP32 probabilities.
    const Device device = parse_device(tc.device);
    const DType precision = parse_dtype(tc.precision);
    check_train_device(device, precision, /*ranks=*/1);
    const Stream s{device, nullptr};
    auto model = load_model(a->weights);
    model->to(device);
    model->set_precision(precision);
    model->set_memory_format(resolve_memory_format(tc.memory_format, device, precision));
    const int in_ch = model->config().in_channels;
    const int k = model->config().num_classes;
    // Fail before the (long) evaluation pass when the options cannot apply.
    LANCET_CHECK(k == 2 || (!a->threshold && !a->target_sensitivity),
                 "--threshold and --target-sensitivity need a binary task; " << a->weights << " has " << k
                                                                              << " classes");
    if (dc.channels != in_ch) {  // the weights decide what the model reads
      if (is_given(given_settings(a->config), "data.channels"))
        std::cerr << "eval: data.channels " << dc.channels << " given, but the model reads " << in_ch
                  << ": using " << in_ch << "\n";
      dc.channels = in_ch;
    }
    dc.val_split = a->split;
    dc.train_split = a->split;
    DataSplits data = load_data(dc, std::cerr);
    LANCET_CHECK(data.val->num_classes() == k,
                 a->weights << " has " << k << " classes, the data has " << data.val->num_classes());
    const Loss loss = make_loss(loss_config(config), data.val->num_classes(), device);
    StepProfiler prof;
    prof.set_stream(s);
    // Fed as training is: data.workers threads decode ahead, and on a GPU each pinned batch is
    // copied on a stream of its own while the batch before runs (trainer.h, evaluate).
    const EvalResult r = evaluate(*model, *data.val, tc.batch_size, loss, s, &prof, eval_loading(dc, device));
    ReportOptions options;
    options.threshold = a->threshold;
    options.target_sensitivity = a->target_sensitivity;
    const ClassificationReport report = classification_report(r.probs, r.labels, k, data.val->class_names(), options);
    std::cout << std::fixed << std::setprecision(4) << "loss              " << r.loss << "\n" << report.to_text();
    std::cerr << "inference profile (" << prof.steps() << " batches of " << tc.batch_size << ", " << dc.workers
              << " loader worker(s))\n"
              << prof.table();
    if (!a->report.empty()) {
      Json j = report.to_json();
      j["loss"] = r.loss;
      j["weights"] = a->weights;
      j["data"] = data.source;
      j["split"] = a->split;
      j["preprocessing"] = {{"dicom_window", config["data"]["dicom"]["window"]},
                            {"preprocess", config["data"]["preprocess"]},
                            {"image_size", dc.image_size},
                            {"bit_depth", dc.bit_depth},
                            {"channels", dc.channels},
                            {"mean", dc.mean},
                            {"std", dc.std}};
      j["compute"] = {{"device", device.str()}, {"precision", tc.precision}};  // not the metric "precision"
      j["inference_profile"] = prof.to_json();
      write_atomically(a->report, [&](std::ostream& os) { os << j.dump(2) << "\n"; });
    }
    if (!a->predictions.empty()) {
      // Where each sample came from (its file; for a pack, the file it was packed from), for
      // error analysis.
      std::vector<std::string> sources;
      if (const auto* cached = dynamic_cast<const CachedImageDataset*>(data.val.get()))
        for (int64_t i = 0; i < cached->size(); ++i) sources.push_back(cached->origin(i));
      write_atomically(a->predictions, [&](std::ostream& os) { write_predictions_csv(os, report, r.probs, sources); });
    }
  });
}

}  // namespace lancet::cli
