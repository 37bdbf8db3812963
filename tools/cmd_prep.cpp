// lancet prep — pack a dataset (image folder or manifest, DICOMs included, or a MedMNIST
// .npz) into one HDF5 file: decoded, preprocessed with data.preprocess and resized once, with
// labels, class names, the recipe and a content hash (data/pack.h). Training reads it with
// --data PACK.h5.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <sstream>
#include <thread>

#include "data/pack.h"
#include "kernels/parallel.h"
#include "tools/cli.h"

namespace lancet::cli {

void register_prep(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "prep", "pack a folder, CSV manifest, DICOM folder or .npz into an HDF5 pack (preprocessed, resized, hashed)");
  struct Args {
    ConfigArgs config;
    std::string out, splits;
    int compress = 0;
  };
  auto a = std::make_shared<Args>();
  sub->add_option("--out", a->out, "the pack to write (PACK.h5; written atomically)")->required();
  sub->add_option("--splits", a->splits, "comma-separated splits to pack (default: whichever of train,val,test exist)");
  sub->add_option("--compress", a->compress, "gzip level 1-9 for the images (0 = uncompressed)")
      ->check(CLI::Range(0, 9))
      ->capture_default_str();
  // --data, --image-size, --channels, --bit-depth, --on-bad-sample, --threads, --config (data.preprocess,
  // data.dicom.window), --set.
  add_config_options(*sub, a->config, /*with_training_flags=*/false);
  sub->callback([a]() {
    const Json config = resolve_config(a->config);
    const DataConfig dc = data_config(config);
    const TrainConfig tc = train_config(config);
    LANCET_CHECK(!dc.dir.empty(), "lancet prep needs --data (a folder, a manifest folder or an .npz)");
    set_num_threads(tc.threads > 0 ? tc.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    PackOptions po;
    po.load.channels = dc.channels;
    po.load.image_size = dc.image_size;
    po.load.bit_depth = dc.bit_depth;
    po.load.dicom_window = dc.dicom_window;
    po.load.classes = dc.classes;
    if (!dc.preprocess.empty())
      po.load.recipe = std::make_shared<const PreprocessRecipe>(PreprocessRecipe::from_json(dc.preprocess));
    std::istringstream ss(a->splits);
    for (std::string s; std::getline(ss, s, ',');)
      if (!s.empty()) po.splits.push_back(s);
    po.gzip = a->compress;
    po.on_bad = parse_bad_sample(dc.on_bad_sample);
    po.log = &std::cerr;
    po.progress_tty = ::isatty(::fileno(stderr)) == 1;
    write_pack(dc.dir, a->out, po);
  });
}

}  // namespace lancet::cli
