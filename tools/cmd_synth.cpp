// lancet synth — write the synthetic chest X-ray dataset as PNG class folders + manifest.csv.
#include <iostream>

#include "data/synth.h"
#include "kernels/parallel.h"
#include "tools/cli.h"

namespace lancet::cli {

void register_synth(CLI::App& app) {
  auto* sub = app.add_subcommand("synth", "write synthetic chest X-rays (normal / opacity) as PNG folders and a CSV manifest");
  struct Args {
    std::string out;
    SynthOptions opt;
    bool overwrite = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  sub->add_option("--out", a->out, "output folder (<out>/{train,val}/{normal,opacity}/*.png, <out>/manifest.csv)")->required();
  sub->add_option("--train", a->opt.train, "training images")->capture_default_str();
  sub->add_option("--val", a->opt.val, "validation images")->capture_default_str();
  sub->add_option("--size", a->opt.image_size, "image size in pixels (square)")->capture_default_str();
  sub->add_option("--seed", a->opt.seed, "seed (images depend only on seed and index)")->capture_default_str();
  sub->add_option("--positive-fraction", a->opt.positive_fraction, "fraction of images with opacities")->capture_default_str();
  sub->add_option("--threads", a->threads, "threads (0 = all cores)");
  sub->add_flag("--overwrite", a->overwrite, "replace an existing dataset folder");
  sub->callback([a]() {
    if (a->threads > 0) set_num_threads(a->threads);
    write_synthetic_cxr(a->out, a->opt, a->overwrite);
    std::cerr << "wrote " << a->opt.train << " train and " << a->opt.val << " val images to " << a->out << "\n";
  });
}

}  // namespace lancet::cli
