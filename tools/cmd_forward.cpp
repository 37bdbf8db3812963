// lancet forward — the numerics check of ../shared/spec/interchange.md: logits (and with
// --grads the loss and every parameter's gradient) for a batch file, written to an HDF5 file.
#include <filesystem>
#include <iostream>

#include "data/h5file.h"
#include "kernels/loss.h"
#include "kernels/parallel.h"
#include "tools/cli.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

namespace lancet::cli {

namespace {
struct ForwardArgs {
  std::string weights, input, output, mode = "eval", device = "cpu", precision = "fp32", memory_format = "auto";
  bool grads = false;
  int threads = 0;
};

void run_forward(const ForwardArgs& a) {
  const Device device = parse_device(a.device);
  if (a.threads > 0) set_num_threads(a.threads);
  const Stream s{device, nullptr};

  auto model = load_model(a.weights);
  // fp16 / bf16 (layers/module.h): emulated on the CPU (activations, gradients and conv/linear
  // weights rounded to the 16-bit type), 16-bit tensors and tensor-core GEMMs on a GPU;
  // BatchNorm, softmax and the loss in FP32 either way, logits and gradients written as FP32.
  model->set_precision(parse_dtype(a.precision));
  model->set_memory_format(resolve_memory_format(a.memory_format, device, parse_dtype(a.precision)));
  const MedicalCNNConfig& mc = model->config();

  H5File in = H5File::open_read(a.input);
  LANCET_CHECK(in.has("/images"), a.input << ": no /images dataset");
  const Shape xs = in.shape_of("/images");
  LANCET_CHECK(xs.size() == 4, a.input << ": /images must be [N, C, H, W], got rank " << xs.size() << " "
                                      << shape_str(xs));
  LANCET_CHECK(xs[1] == mc.in_channels, a.input << ": /images has " << xs[1] << " channels, the model in "
                                                 << a.weights << " expects " << mc.in_channels);
  LANCET_CHECK(xs[0] >= 1, a.input << ": /images holds no images");
  Tensor x = in.read("/images");
  LANCET_CHECK(x.dtype() == DType::f32, a.input << ": /images must be float32, got " << dtype_name(x.dtype()));
  Tensor y;
  if (a.grads) {
    LANCET_CHECK(in.has("/labels"), a.input << ": --grads needs a /labels dataset");
    y = in.read("/labels");
    LANCET_CHECK(y.dtype() == DType::i64 || y.dtype() == DType::i32,
                 a.input << ": /labels must be int64, got " << dtype_name(y.dtype()));
    LANCET_CHECK(y.shape() == Shape{xs[0]}, a.input << ": /labels has shape " << y.shape_str() << ", expected ["
                                                    << xs[0] << "] to match /images");
    if (y.dtype() == DType::i32) {
      Tensor y64 = Tensor::empty(y.shape(), DType::i64);
      for (int64_t i = 0; i < y.numel(); ++i) y64.data<int64_t>()[i] = y.data<int32_t>()[i];
      y = y64;
    }
    for (int64_t i = 0; i < y.numel(); ++i) {
      const int64_t v = y.data<int64_t>()[i];
      LANCET_CHECK(v >= 0 && v < mc.num_classes, a.input << ": /labels[" << i << "] = " << v << " is outside [0, "
                                                         << mc.num_classes << ")");
    }
  }

  // Train mode: batch statistics, running statistics left as they are, dropout off.
  model->train(a.mode == "train");
  model->set_update_running_stats(false);
  model->set_dropout_enabled(false);
  model->to(device);
  if (device.is_cuda()) {
    x = x.to(device);
    if (y.defined()) y = y.to(device);
  }

  SavedPtr saved;
  Tensor logits = model->forward(x, a.grads ? &saved : nullptr, s);
  H5File out = H5File::create_atomic(a.output);
  out.write("/logits", logits.to(Device::cpu()));
  if (a.grads) {
    Tensor dlogits = Tensor::empty(logits.shape(), DType::f32, device);
    Tensor none;
    const float loss = softmax_cross_entropy(logits, y, Tensor(), 0.f, dlogits, none, s);
    model->zero_grad();
    model->backward(dlogits, *saved, /*need_input_grad=*/false, s);
    Tensor l = Tensor::empty({}, DType::f32);
    *l.data<float>() = loss;
    out.write("/loss", l);
    for (auto& [name, p] : model->named_parameters()) out.write("/grads/" + name, p->grad.to(Device::cpu()));
  }
  out.commit();
}
}  // namespace

void register_forward(CLI::App& app) {
  auto* sub = app.add_subcommand("forward", "run weights on a batch file and write logits (and gradients): the PyTorch numerics check");
  auto a = std::make_shared<ForwardArgs>();
  sub->add_option("--weights", a->weights, "weights file (interchange HDF5)")->required();
  sub->add_option("--input", a->input, "batch file: /images f32 [N,C,H,W], /labels i64 [N] (for --grads)")->required();
  sub->add_option("--output", a->output, "output HDF5: /logits, and /loss and /grads/<name> with --grads")->required();
  sub->add_option("--mode", a->mode, "eval: running statistics; train: batch statistics (not written back), dropout off")
      ->check(CLI::IsMember({"eval", "train"}))
      ->capture_default_str();
  sub->add_flag("--grads", a->grads, "also write the loss and d loss / d parameter for every trainable parameter");
  sub->add_option("--device", a->device, "cpu or cuda[:N]")->capture_default_str();
  sub->add_option("--precision", a->precision, "fp32 | fp16 | bf16")->check(CLI::IsMember({"fp32", "fp16", "bf16"}))
      ->capture_default_str();
  sub->add_option("--memory-format", a->memory_format, "auto (channels_last for fp16/bf16 on a GPU) | nchw | channels_last")
      ->check(CLI::IsMember({"auto", "nchw", "channels_last"}));
  sub->add_option("--threads", a->threads, "CPU threads (0 = all cores)");
  sub->callback([a]() { run_forward(*a); });
}

}  // namespace lancet::cli
