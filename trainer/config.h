// config.h — lancet's one configuration system.
//
// A run is described by a tree of sections (model, data, train, amp, optim, loss, ...) with
// documented defaults (default_config()). A YAML file (--config) is merged over the
// defaults, then command-line overrides (--set section.key=value, and the short flags that
// map onto keys). Unknown keys are rejected with the list of valid ones, values are checked
// for type, and the resolved tree is printed at start and saved with the run. The `model`
// section takes the same keys as the interchange spec's model JSON.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace lancet {

using Json = nlohmann::json;

Json default_config();

// The embedded default job (`lancet train` without --config): default_config() with a
// compact MedicalCNN (widths 32-64-128-256, one block per stage, head_hidden 128; every other
// model setting as the spec says) trained at 64x64 on 4000 synthetic chest X-rays for 10
// epochs, validated on 1000. About 0.95 validation accuracy in 1.5 minutes on 2 cores.
Json default_job_config();

// Merges `overlay` into `base`; every key in overlay must exist in base (under `model`: be a
// MedicalCNNConfig key; the model validates the values) and have a compatible type. An unknown
// key fails naming the closest valid one (did-you-mean) and listing the valid keys.
void merge_config(Json& base, const Json& overlay, const std::string& where);

// Reads a YAML file into JSON (scalars typed: ints, floats, bools, strings; sequences; maps).
Json load_yaml_file(const std::string& path);

// Applies "section.key=value" (value parsed as YAML, so 1e-3, [64, 128], true all work).
void apply_override(Json& config, const std::string& assignment);

// Typed views of the resolved tree.
struct DataConfig {
  std::string dir;  // "" = the default job's synthetic dataset (created in the cache folder)
  std::string train_split, val_split;
  int image_size;
  int channels;
  int bit_depth = 8;  // 8 or 16: the depth images keep up to normalisation (data/image_folder.h)
  std::vector<float> mean, std;
  int64_t synth_train, synth_val;
  int synth_size;
  uint64_t synth_seed;
  std::vector<double> dicom_window;  // [centre, width] for DICOM files; empty: the file's window, else min-max
  Json preprocess;                   // the preprocessing recipe (data/preprocess.h), a JSON list of ops
  Json augment;                      // training augmentation (AugmentConfig JSON, data/augment.h)
  int workers = 2;                   // loader threads (data/loader.h); 0 = in the training thread
  int prefetch = 2;                  // batches prepared ahead per worker
  std::string sampler = "shuffle";   // shuffle | balanced | oversample
  std::string on_bad_sample = "error";  // error | skip (data/image_dataset.h)
  bool cache = true;  // false: samples decoded (or read from the pack) on every read, for data larger than memory
  std::vector<std::string> classes;  // the class list in label order (data/image_folder.h); empty: inferred
};
struct TrainConfig {
  int epochs;
  int64_t max_steps;  // 0 = no limit
  int batch_size;
  bool drop_last;
  uint64_t seed;
  std::string device;
  int threads;  // 0 = all cores
  std::string precision;
  std::string out;  // run folder; "" = none
  int log_every;
  // Checkpoints go to OUT/checkpoints/ at the end of every epoch and, when checkpoint_every
  // > 0, every that many steps; the newest keep_checkpoints are kept.
  int64_t checkpoint_every;
  int keep_checkpoints;
  std::string resume;  // "" = fresh run, "auto" = newest valid checkpoint in OUT, or a path
  float clip_grad_norm;  // 0 = off
  std::string profile;   // Chrome trace path; "" = off
  int64_t nsys_first = 0, nsys_last = 0;  // Nsight capture range in steps (1-based); 0 = off
  bool tensorboard;      // event files in OUT/tensorboard
  // Micro-batches per optimizer step: each rank's share of batch_size is split this many ways
  // and the gradients accumulate (synchronised across ranks only after the last).
  int grad_accum_steps = 1;
  // GPU convolutions: benchmark cuDNN's candidate algorithms once per shape and keep the
  // fastest (torch.backends.cudnn.benchmark) instead of taking cuDNN's heuristic choice.
  bool cudnn_autotune = false;
  // f32 convolutions and GEMMs on tensor cores with TF32 inputs (PyTorch's default for cuDNN
  // convolutions); off keeps GPU f32 results within f32 tolerances of the CPU reference.
  bool allow_tf32 = false;
  // Activations' memory format: auto | nchw | channels_last (resolve_memory_format, trainer.h).
  std::string memory_format = "auto";
};
// Data parallelism (mpirun / srun with several tasks). train.batch_size is the GLOBAL batch:
// each of R ranks takes batch_size / R samples per step, so a run's optimisation does not
// change with the rank count.
struct DistConfig {
  std::string backend;  // auto (several tasks: NCCL on GPUs, MPI on CPUs), mpi, single, nccl
  double bucket_mb;     // gradient bucket size
  bool overlap;         // all-reduce buckets during the backward
  bool sync_bn;         // SyncBatchNorm: batch statistics over all ranks
  double timeout_s;     // a collective waiting longer fails the job; <= 0 = never
  std::string bind;     // auto, cores, none: pinning of each rank's threads
  // The epoch order's tail that does not fill a round of ranks: false pads it by repeating
  // the order's first samples (DistributedSampler's default), true drops it (drop_last=True):
  // every rank takes floor(n / ranks) samples and none repeats within an epoch.
  bool sampler_drop_last = false;
};
// Pipeline model parallelism (trainer/pipeline.h): the model's chain of units split into
// `stages` stages run concurrently on micro-batches.
struct PipelineConfig {
  int stages = 1;                  // 1 = no pipeline, 2 = two stages
  int micro_batches = 4;           // per step (and per rank): the step's batch split this many ways
  std::string schedule = "1f1b";   // gpipe | 1f1b
  std::string cut = "auto";        // auto, or the name of stage 1's first unit ("stages.2.0")
  std::string balance = "time";    // cut auto balances measured time per unit, or forward FLOPs
  int threads_per_stage = 0;       // CPU stages: 0 = the rank's threads split evenly
  std::vector<std::string> devices;  // one per stage; empty = every stage on train.device
};
struct OptimConfig {
  std::string name;  // sgd, adam, adamw
  float lr, weight_decay, momentum, beta1, beta2, eps;
  bool nesterov;
};
// Mixed precision (train.precision fp16 / bf16): dynamic loss scaling as torch's GradScaler
// (trainer/loss_scaler.h). amp.loss_scaling auto: on for fp16, off for bf16 and fp32.
struct LossScalerConfig {
  bool enabled = false;
  float init_scale = 65536.f;  // 2^16
  // Doubles, as GradScaler's: scale * factor is computed in double and rounded to float once
  // (torch's _amp_update_scale_), so factors that are not powers of two give torch's scales.
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
};
struct LossConfig {
  float label_smoothing;
  std::vector<float> class_weights;  // empty = unweighted
};

DataConfig data_config(const Json& c);
TrainConfig train_config(const Json& c);
DistConfig dist_config(const Json& c);
PipelineConfig pipeline_config(const Json& c);
OptimConfig optim_config(const Json& c);
LossConfig loss_config(const Json& c);
// amp.* resolved against train.precision (which must be fp32, fp16 or bf16).
LossScalerConfig loss_scaler_config(const Json& c);

// The folder the default job caches its synthetic dataset in: $LANCET_CACHE, else
// $XDG_CACHE_HOME/lancet, else ~/.cache/lancet.
std::string cache_dir();

}  // namespace lancet
