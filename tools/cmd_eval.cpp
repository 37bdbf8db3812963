// lancet eval — evaluate a weights file on a dataset split and print (and save) the clinical
// report: accuracy, per-class precision / sensitivity / specificity / F1, AUROC, confusion
// matrix, and for binary tasks a decision threshold and an operating point at a target sensitivity.
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <optional>
#include <thread>

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
  sub->add_option("--split", a->split, "split to evaluate (manifest split or sub-folder; '' = all)");
  sub->add_option("--report", a->report, "also write the full report as JSON to this file");
  sub->add_option("--predictions", a->predictions,
                  "write per-sample rows (index,label,predicted,prob_<class>...) as CSV to this file");
  sub->add_option("--threshold", a->threshold, "binary tasks: predict class 1 when P(class 1) >= T (default 0.5)");
  sub->add_option("--target-sensitivity", a->target_sensitivity,
                  "binary tasks: also report the largest threshold reaching this sensitivity, in (0, 1]");
  add_config_options(*sub, a->config, /*with_training_flags=*/false);
  sub->callback([a]() {
    const Json config = resolve_config(a->config);
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
    if (dc.channels != in_ch) dc.channels = in_ch;  // the weights decide what the model reads
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
      j["compute"] = {{"device", device.str()}, {"precision", tc.precision}};  // not the metric "precision"
      j["inference_profile"] = prof.to_json();
      write_atomically(a->report, [&](std::ostream& os) { os << j.dump(2) << "\n"; });
    }
    if (!a->predictions.empty())
      write_atomically(a->predictions, [&](std::ostream& os) { write_predictions_csv(os, report, r.probs); });
  });
}

}  // namespace lancet::cli
