// medicalcnn.h — the reference MedicalCNN (/shared/spec/medicalcnn.md) and its configuration.
//
// Module tree (state_dict names as the PyTorch reference):
//   stem      Sequential: 0 Conv 7x7 s2 p3, 1 BatchNorm, 2 ReLU, 3 MaxPool 3 s2 p1
//   stages.i.j  BasicResidualBlock (stride 2 for j = 0 when i > 0)
//   context   ContextBlock(widths.back(), context_width)
//   pool      GlobalAvgPool ([N, C, H, W] -> [N, C]; no parameters)
//   head      Sequential: 0 Dropout, 1 Linear C -> head_hidden, 2 ReLU, 3 Dropout, 4 Linear -> classes
// Input [N, in_channels, H, W]; output logits [N, num_classes].
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "layers/blocks.h"

namespace lancet {

struct MedicalCNNConfig {
  int in_channels = 3;
  int num_classes = 2;
  std::vector<int> widths{64, 128, 256, 512};
  std::vector<int> depths{3, 4, 6, 3};
  int se_reduction = 16;
  int context_width = 0;  // 0: widths.back() / 8, at least 1
  int head_hidden = 256;
  std::vector<float> dropout{0.5f, 0.3f};  // before head.1 and before head.4

  // The interchange spec's model JSON: keys name ("medicalcnn" when present), in_channels,
  // num_classes, widths, depths, se_reduction, context_width, head_hidden, dropout. Absent keys
  // take the defaults; unknown keys and bad values throw naming the key.
  static MedicalCNNConfig from_json(const nlohmann::json& j);
  // Every key, with name "medicalcnn" and context_width resolved (never 0).
  nlohmann::json to_json() const;
  void validate() const;  // throws naming the first bad field
  int resolved_context_width() const;
};

class MedicalCNN : public Module {
 public:
  // Weights are drawn from std::mt19937_64(seed) in registration order: the same config and
  // seed give bit-identical weights. The dropout seeds are derived from `seed` too.
  MedicalCNN(const MedicalCNNConfig& config, uint64_t seed);
  const char* type_name() const override { return "MedicalCNN"; }
  const MedicalCNNConfig& config() const { return cfg_; }

  // Each head dropout gets its own stream derived from `seed`; counters are left as they are.
  void set_dropout_seed(uint64_t seed);
  void set_dropout_enabled(bool on);
  // false: training-mode forwards use batch statistics without writing the running ones.
  void set_update_running_stats(bool on);
  // The head's dropouts in order; their counters belong in checkpoints.
  const std::vector<Dropout*>& dropouts() const { return dropouts_; }

  // The model as a chain run in order, for pipeline stages (a contiguous slice, run with
  // chain_forward / chain_backward): "stem", "stages.0.0", ..., "context", "pool", "head".
  const std::vector<std::pair<std::string, Module*>>& units() const { return units_; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;

 private:
  MedicalCNNConfig cfg_;
  std::vector<std::pair<std::string, Module*>> units_;
  std::vector<Module*> chain_;  // units_' modules
  std::vector<Dropout*> dropouts_;
};

}  // namespace lancet
