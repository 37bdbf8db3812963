// checkpoint.h — training checkpoints: everything a run needs to continue bit-identically.
//
// A checkpoint is an interchange weights file (/model/<name> datasets and the `model`
// attribute; see ../shared/spec/interchange.md), so any weights reader loads it, plus:
//   /optimizer/<param>.<slot>   optimizer state tensors (momentum_buffer, exp_avg, exp_avg_sq)
//   /optimizer  attr `state`    {"name", "steps", "lr"} as JSON
//   /train      attr `state`    TrainState as JSON (position, counters, RNG, schedule, ...)
//   /train      attr `config`   the resolved run configuration as JSON
// Files are written atomically (temporary file, fsync, rename): a crash while writing leaves
// the previous checkpoints as they were.
#pragma once
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "layers/medicalcnn.h"
#include "trainer/config.h"
#include "trainer/optimizer.h"

namespace lancet {

// Where a run is and what it has accumulated; with the weights and optimizer state this is
// the whole of a run's state (the epoch order derives from (train.seed, epoch)).
struct TrainState {
  int epoch = 1;               // the epoch in progress (1-based)
  int64_t step_in_epoch = 0;   // steps of `epoch` already taken
  int64_t global_step = 0;     // steps taken in the whole run
  int64_t images = 0;          // training images seen in the whole run
  double train_seconds = 0;    // training time so far (excluding validation)
  double epoch_loss_sum = 0;   // the running sums of the epoch in progress
  int64_t epoch_correct = 0, epoch_seen = 0;
  int64_t epoch_skipped = 0;   // optimizer steps of the epoch skipped by the loss scaler
  int64_t train_size = 0;      // training images in the dataset (a resume must see the same)
  std::vector<uint64_t> dropout_counters;  // MedicalCNN::dropouts() in order
  Json schedule = Json::object();          // LR schedule state
  Json early_stopping = Json::object();    // early-stopping state (best value and epoch)
  Json loss_scaler = Json::object();       // LossScaler::state() with fp16 loss scaling; {} = none

  Json to_json() const;
  // Throws naming `where` on a missing or mistyped field.
  static TrainState from_json(const Json& j, const std::string& where);
};

// Writes a checkpoint to `path` atomically. The model may live on any device.
void save_checkpoint(const std::string& path, MedicalCNN& model, const Json& model_config, Optimizer& opt,
                     const std::string& optimizer_name, const TrainState& state, const Json& config);

// Checks that `path` can continue a run configured as `config`, then loads weights, optimizer
// state and dropout counters into `model` and `opt` and returns the saved state. Refuses
// (naming the file and the first mismatch: setting, value there and here) a checkpoint from
// an incompatible run: different model, data, batch size, seed, optimizer or precision.
// Settings that may change on resume: train.epochs, max_steps, out, threads, log_every,
// checkpoint_every, keep_checkpoints, resume.
TrainState load_checkpoint(const std::string& path, MedicalCNN& model, Optimizer& opt,
                           const std::string& optimizer_name, const Json& config);

// Checkpoint files of a run folder, OUT/checkpoints/step-<global step>.h5, oldest first.
std::string checkpoint_dir(const std::string& out);
std::string checkpoint_path(const std::string& out, int64_t global_step);
std::vector<std::string> list_checkpoints(const std::string& out);

// The newest checkpoint in OUT that opens and holds a training state; damaged ones are
// reported on `log` and skipped. "" when there is none.
std::string newest_valid_checkpoint(const std::string& out, std::ostream& log);

// Deletes all but the newest `keep` checkpoints of OUT.
void prune_checkpoints(const std::string& out, int keep);

// Removes the temporary files (NAME.h5.tmp-PID-N, data/h5file.h) that a writer killed before
// its rename left in OUT and OUT/checkpoints, when process PID no longer exists on this host
// (a live writer's file is left alone). Returns the removed paths.
std::vector<std::string> remove_stale_temp_files(const std::string& out);

}  // namespace lancet
