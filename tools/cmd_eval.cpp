// lancet eval — evaluate a weights file on a dataset split and print (and save) the report.
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <thread>

#include "kernels/parallel.h"
#include "tools/cli.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

namespace lancet::cli {

void register_eval(CLI::App& app) {
  auto* sub = app.add_subcommand("eval", "evaluate weights on a dataset split: accuracy, per-class recall, confusion matrix");
  struct Args {
    ConfigArgs config;
    std::string weights, split = "val", report;
  };
  auto a = std::make_shared<Args>();
  sub->add_option("--weights", a->weights, "weights file (interchange HDF5)")->required()->check(CLI::ExistingFile);
  sub->add_option("--split", a->split, "split to evaluate (manifest split or sub-folder; '' = all)");
  sub->add_option("--report", a->report, "also write the report as JSON to this file");
  add_config_options(*sub, a->config, /*with_training_flags=*/false);
  sub->callback([a]() {
    const Json config = resolve_config(a->config);
    DataConfig dc = data_config(config);
    const TrainConfig tc = train_config(config);
    set_num_threads(tc.threads > 0 ? tc.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    auto model = load_model(a->weights);
    const int in_ch = model->config().in_channels;
    if (dc.channels != in_ch) dc.channels = in_ch;  // the weights decide what the model reads
    dc.val_split = a->split;
    dc.train_split = a->split;
    DataSplits data = load_data(dc, std::cerr);
    LANCET_CHECK(data.val->num_classes() == model->config().num_classes,
                 a->weights << " has " << model->config().num_classes << " classes, the data has "
                            << data.val->num_classes());
    const Loss loss = make_loss(loss_config(config), data.val->num_classes(), Device::cpu());
    const EvalResult r = evaluate(*model, *data.val, tc.batch_size, loss, Stream::cpu());
    Json j = r.cm.to_json(data.val->class_names());
    j["loss"] = r.loss;
    j["weights"] = a->weights;
    j["data"] = data.source;
    j["split"] = a->split;
    std::cout << std::fixed << std::setprecision(4) << "images            " << r.cm.total() << "\n"
              << "loss              " << r.loss << "\n"
              << "accuracy          " << r.cm.accuracy() << "\n"
              << "balanced accuracy " << r.cm.balanced_accuracy() << "\n";
    for (int c = 0; c < r.cm.num_classes(); ++c)
      std::cout << "recall " << std::left << std::setw(11) << data.val->class_names()[c] << std::right
                << r.cm.recall(c) << "\n";
    if (!a->report.empty()) {
      const std::string tmp = a->report + ".tmp";
      {
        std::ofstream f(tmp);
        f << j.dump(2) << "\n";
        LANCET_CHECK(f.good(), "cannot write " << tmp);
      }
      std::filesystem::rename(tmp, a->report);
    }
  });
}

}  // namespace lancet::cli
