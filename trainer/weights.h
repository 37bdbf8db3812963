// weights.h — model weights in the interchange HDF5 layout (../shared/spec/interchange.md):
// /model/<state_dict name> datasets in PyTorch shape and order, float32, and the model's
// configuration as a JSON string attribute `model` on /model.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "data/h5file.h"
#include "layers/medicalcnn.h"
#include "trainer/config.h"

namespace lancet {

// Builds the model a `model` config describes ("name" defaults to medicalcnn).
std::unique_ptr<MedicalCNN> make_model(const Json& model_config, uint64_t seed);

// Writes every state_dict entry (parameters and running statistics) under /model.
void write_weights(H5File& file, Module& model, const Json& model_config);
// Writes a weights file atomically (temp file + rename). With a `run_config` (not null) the
// file also holds the run's resolved configuration as the JSON attribute `config` of /train,
// where checkpoints hold it (trainer/checkpoint.h), so that `lancet eval` preprocesses images
// as the run did; weights readers ignore /train (an extra top-level group, interchange.md).
void save_weights(const std::string& path, Module& model, const Json& model_config,
                  const Json& run_config = Json());

// The `model` attribute of /model, parsed; {} when absent. Throws naming the file otherwise.
Json read_model_config(const H5File& file);

// The training run's configuration saved with the weights (attribute `config` of /train:
// final.h5, best.h5 and checkpoints); nullopt for a file without one (a PyTorch export, a
// final.h5 of an older lancet). Throws naming the file when it is not a JSON object.
std::optional<Json> read_run_config(const H5File& file);

// Loads /model/<name> into every state_dict entry. Fails, naming the file and the entry, on
// the first missing, unexpected or mis-shaped one (`*.num_batches_tracked` is ignored).
void load_weights(const H5File& file, Module& model);

// Opens a weights file, builds the model its config describes and loads it.
std::unique_ptr<MedicalCNN> load_model(const std::string& path);

}  // namespace lancet
