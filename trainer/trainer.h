// trainer.h — the serial training loop (one process; the communicator seam is where data
// parallelism plugs in), evaluation, and the single training step the benchmarks reuse.
#pragma once
#include <cmath>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "data/dataset.h"
#include "data/sampler.h"
#include "layers/module.h"
#include "trainer/config.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/profiler.h"

namespace lancet {

// Loss settings resolved against the dataset: class weights as a tensor on the device.
struct Loss {
  float label_smoothing = 0.f;
  Tensor class_weights;  // undefined = unweighted
};
Loss make_loss(const LossConfig& cfg, int num_classes, Device device);

struct StepStats {
  double loss = 0;
  int64_t correct = 0;
  int64_t count = 0;
  double grad_norm = std::nan("");  // global L2 norm before clipping, when computed
  // Dynamic loss scaling (StepOptions::loss_scaler): the scale this step's backward used, and
  // whether its optimizer step was skipped for inf/NaN gradients.
  float loss_scale = 1.f;
  bool skipped = false;
};

class GradSync;
class LossScaler;

struct StepOptions {
  float clip_grad_norm = 0;        // > 0: clip to this global L2 norm (torch's clip_grad_norm_)
  bool compute_grad_norm = false;  // report the norm even without clipping
  // Data parallelism: bucketed all-reduce overlapped with the backward (trainer/ddp.h). Without
  // it, a communicator of several ranks all-reduces every gradient after the backward.
  GradSync* grad_sync = nullptr;
  // Mixed precision: the loss gradient is multiplied by the scaler's scale before the
  // backward; the synchronised gradients are unscaled and checked before clipping, and on
  // inf/NaN the optimizer step is skipped (weights and optimizer state untouched). The
  // scaler is updated after every step. Null or disabled: no scaling. On a GPU without
  // clipping the unscale is fused into the optimizer step instead (finish_step).
  LossScaler* loss_scaler = nullptr;
};

// Forward (saving activations), loss, backward, gradient all-reduce, clipping, optimizer step,
// zero_grad. With a profiler, each phase is timed (and traced when tracing is on).
StepStats train_step(Module& model, Optimizer& opt, Communicator& comm, const Tensor& x, const Tensor& y,
                     const Loss& loss, const Stream& s, const StepOptions& options = {},
                     StepProfiler* prof = nullptr);

// One optimizer step over micro-batches (gradient accumulation): micro-batch i's loss counts
// with weight xs[i].dim(0) / (total rows), so the step equals one over the concatenated batch
// (up to BatchNorm seeing the micro-batches separately). Gradients are synchronised only after
// the last micro-batch's backward. The returned loss is the weighted mean.
StepStats train_step_micro(Module& model, Optimizer& opt, Communicator& comm, const std::vector<Tensor>& xs,
                           const std::vector<Tensor>& ys, const Loss& loss, const Stream& s,
                           const StepOptions& options = {}, StepProfiler* prof = nullptr);

// Pieces of a step, shared by train_step_micro and the pipeline (trainer/pipeline.h):
// The loss of one micro-batch and the gradient its backward starts from: dL/dlogits times
// `weight` (the micro-batch's share of the step's rows; 1 = a whole step) times `scale` (the
// loss scale; 1 = none).
float micro_batch_loss(const Tensor& logits, const Tensor& y, const Loss& loss, double weight, float scale,
                       Tensor& dlogits, const Stream& s);
// Rows whose argmax is the label.
int64_t count_correct(const Tensor& logits, const Tensor& y);
// Everything after the backward: gradient synchronisation (skipped when `synced`: the caller has
// averaged the gradients already), loss-scaler unscale and check, clipping, the optimizer step
// (or the skip), zero_grad. Sets st.grad_norm and st.skipped.
void finish_step(Module& model, Optimizer& opt, Communicator& comm, const StepOptions& options, bool synced,
                 StepStats& st, StepProfiler& timer, const Stream& s);

struct EvalResult {
  double loss = 0;
  ConfusionMatrix cm{1};  // argmax predictions
  // Per sample, in dataset order: softmax probabilities [n * k] (row-major) and labels [n],
  // for threshold-free metrics (AUROC) and per-sample prediction files.
  std::vector<float> probs;
  std::vector<int64_t> labels;
};
// How evaluate() reads its batches: a DataLoader (data/loader.h) without augmentation. The
// default builds each batch in the evaluating thread, as when no data config is at hand.
struct EvalLoading {
  int workers = 0;                 // loader threads; 0 = each batch built in evaluate() itself
  int prefetch = 2;                // batches prepared ahead per worker, >= 1
  Allocator* allocator = nullptr;  // host batch buffers; null = the CPU allocator
};
// A data config's loading (data.workers, data.prefetch), with pinned host batches for a GPU
// `device` as the training loader has: what run_training's validation and lancet eval use.
EvalLoading eval_loading(const DataConfig& data, Device device);

// Eval-mode pass over a dataset in order (restores the model's mode afterwards, also when it
// throws): contiguous batches of batch_size (>= 1), the last one partial. `s` must be on the
// model's device. The result depends on the batches only, never on `loading` (the loader's
// batches are the same bytes for any worker count). On a GPU batch k+1's host->device copy runs
// on a copy stream of its own during batch k's forward (data/device_prefetch.h) while the workers
// decode further ahead. A dataset read error ("<file>: <reason>") is rethrown as it is. With a
// profiler, each batch is a step with data_wait (the loader), h2d (the forward's wait for its
// copy; GPU only) and forward phases: the inference profile.
EvalResult evaluate(Module& model, const Dataset& ds, int batch_size, const Loss& loss, const Stream& s,
                    StepProfiler* prof = nullptr, const EvalLoading& loading = {});
// The same over the ranks of a data-parallel job: each rank evaluates its contiguous share and
// every rank gets the whole result, in dataset order. Every rank must call it.
EvalResult evaluate_sharded(Module& model, const Dataset& ds, int batch_size, const Loss& loss, const Stream& s,
                            Communicator& comm, const EvalLoading& loading = {});


struct TrainSummary {
  int64_t steps = 0;
  double seconds = 0;
  double images_per_s = 0;
  bool stopped_early = false;
  EvalResult final_eval;
  // The device allocator's peak over this session's epochs (training and validation): what
  // the run needed at its precision, as metrics.jsonl's per-epoch peak_bytes.
  size_t peak_bytes = 0;
};

// Refuses, naming the setting, a device / precision / rank count combination this build cannot
// train with (a missing GPU, a build without CUDA, several GPU ranks without NCCL), before any
// data is read. A CPU device always passes.
void check_train_device(Device device, DType precision, int ranks);

// train.memory_format resolved for a run on `device` at `precision`: "auto" is channels_last
// for fp16 / bf16 on a GPU (cuDNN's tensor-core convolutions take NHWC natively, as PyTorch AMP
// users set model.to(memory_format=torch.channels_last)) and nchw otherwise (the CPU kernels
// are fastest in nchw; channels_last there converts around every convolution).
MemoryFormat resolve_memory_format(const std::string& setting, Device device, DType precision);

// The GPUs each rank of this job trains on, as make_communicator and rank_device take it: with
// train.device cuda and pipeline stages, 1 + the highest index in pipeline.devices (2 for
// [cuda:0, cuda:1]: rank i of a node owns cuda:2i and cuda:2i+1); 1 otherwise.
int gpus_per_rank(const Json& config);

// Runs a whole training job from a resolved config: data, model, epochs, per-epoch validation,
// DIR/metrics.jsonl and DIR/final.h5 when train.out is set. Progress goes to `log`.
TrainSummary run_training(const Json& config, Communicator& comm, std::ostream& log);

// The datasets a config names: the folder in data.dir, or (dir empty) the default job's
// synthetic chest X-ray set, generated once into the cache folder and reused.
struct DataSplits {
  std::shared_ptr<const Dataset> train, val;  // one dataset when both name the same split
  std::string source;  // for the log
};
// Both splits are CachedImageDataset (data/image_dataset.h): 8- or 16-bit images (data.bit_depth),
// normalised on read. When data.val_split names data.train_split (lancet eval) it is loaded once.
// With data.on_bad_sample skip, the files dropped are listed in the log (skipped_report).
DataSplits load_data(const DataConfig& cfg, std::ostream& log);
// "data.on_bad_sample skip: N bad <split> file(s) skipped (not used):" and one indented line
// "<file>: <reason>" per file; "" when ds skipped nothing (or is not a CachedImageDataset).
std::string skipped_report(const Dataset& ds, const std::string& split);

}  // namespace lancet
