#include "layers/medicalcnn.h"

#include <algorithm>
#include <climits>
#include <nlohmann/json.hpp>
#include <random>

namespace lancet {

// ---- MedicalCNNConfig -----------------------------------------------------------------------

namespace {

const char* const kConfigKeys[] = {"name",         "in_channels",   "num_classes", "widths", "depths",
                                   "se_reduction", "context_width", "head_hidden", "dropout"};

int json_int(const nlohmann::json& v, const std::string& key) {
  LANCET_CHECK(v.is_number_integer(), "medicalcnn config: '" << key << "' must be an integer, got " << v.dump());
  if (v.is_number_unsigned()) {
    const auto u = v.get<uint64_t>();
    LANCET_CHECK(u <= static_cast<uint64_t>(INT_MAX), "medicalcnn config: '" << key << "' = " << u << " is too large");
    return static_cast<int>(u);
  }
  const auto i = v.get<int64_t>();
  LANCET_CHECK(i >= INT_MIN && i <= INT_MAX, "medicalcnn config: '" << key << "' = " << i << " is out of range");
  return static_cast<int>(i);
}

std::vector<int> json_int_list(const nlohmann::json& v, const std::string& key) {
  LANCET_CHECK(v.is_array(), "medicalcnn config: '" << key << "' must be a list of integers, got " << v.dump());
  std::vector<int> out;
  for (size_t i = 0; i < v.size(); ++i) out.push_back(json_int(v[i], key + "[" + std::to_string(i) + "]"));
  return out;
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return "[" + s + "]";
}

}  // namespace

MedicalCNNConfig MedicalCNNConfig::from_json(const nlohmann::json& j) {
  LANCET_CHECK(j.is_object(), "medicalcnn config: expected a JSON object, got " << j.dump());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const bool known = std::find(std::begin(kConfigKeys), std::end(kConfigKeys), it.key()) != std::end(kConfigKeys);
    LANCET_CHECK(known, "medicalcnn config: unknown key '" << it.key()
                                                           << "' (known: name, in_channels, num_classes, widths, depths, "
                                                              "se_reduction, context_width, head_hidden, dropout)");
  }
  MedicalCNNConfig c;
  if (j.contains("name")) {
    const auto& n = j["name"];
    LANCET_CHECK(n.is_string() && n.get<std::string>() == "medicalcnn",
                 "medicalcnn config: 'name' must be \"medicalcnn\", got " << n.dump());
  }
  if (j.contains("in_channels")) c.in_channels = json_int(j["in_channels"], "in_channels");
  if (j.contains("num_classes")) c.num_classes = json_int(j["num_classes"], "num_classes");
  if (j.contains("widths")) c.widths = json_int_list(j["widths"], "widths");
  if (j.contains("depths")) c.depths = json_int_list(j["depths"], "depths");
  if (j.contains("se_reduction")) c.se_reduction = json_int(j["se_reduction"], "se_reduction");
  if (j.contains("context_width")) c.context_width = json_int(j["context_width"], "context_width");
  if (j.contains("head_hidden")) c.head_hidden = json_int(j["head_hidden"], "head_hidden");
  if (j.contains("dropout")) {
    const auto& d = j["dropout"];
    LANCET_CHECK(d.is_array() && d.size() == 2 && d[0].is_number() && d[1].is_number(),
                 "medicalcnn config: 'dropout' must be a list of two probabilities, got " << d.dump());
    c.dropout = {d[0].get<float>(), d[1].get<float>()};
  }
  c.validate();
  return c;
}

nlohmann::json MedicalCNNConfig::to_json() const {
  return nlohmann::json{{"name", "medicalcnn"},         {"in_channels", in_channels},
                        {"num_classes", num_classes},   {"widths", widths},
                        {"depths", depths},             {"se_reduction", se_reduction},
                        {"context_width", resolved_context_width()},
                        {"head_hidden", head_hidden},   {"dropout", dropout}};
}

void MedicalCNNConfig::validate() const {
  LANCET_CHECK(in_channels >= 1, "medicalcnn config: in_channels must be >= 1, got " << in_channels);
  LANCET_CHECK(num_classes >= 1, "medicalcnn config: num_classes must be >= 1, got " << num_classes);
  LANCET_CHECK(!widths.empty() && widths.size() == depths.size(),
               "medicalcnn config: widths " << join(widths) << " and depths " << join(depths)
                                            << " must be non-empty and of the same length");
  for (int w : widths) LANCET_CHECK(w >= 1, "medicalcnn config: widths must be positive, got " << join(widths));
  for (int d : depths) LANCET_CHECK(d >= 1, "medicalcnn config: depths must be positive, got " << join(depths));
  LANCET_CHECK(se_reduction >= 1, "medicalcnn config: se_reduction must be >= 1, got " << se_reduction);
  LANCET_CHECK(context_width >= 0, "medicalcnn config: context_width must be >= 0 (0: widths[-1] / 8), got "
                                       << context_width);
  LANCET_CHECK(head_hidden >= 1, "medicalcnn config: head_hidden must be >= 1, got " << head_hidden);
  LANCET_CHECK(dropout.size() == 2, "medicalcnn config: dropout must hold two probabilities, got "
                                        << dropout.size());
  for (float p : dropout)
    LANCET_CHECK(p >= 0.0f && p < 1.0f, "medicalcnn config: dropout probabilities must be in [0, 1), got " << p);
}

int MedicalCNNConfig::resolved_context_width() const {
  return context_width > 0 ? context_width : std::max(1, widths.back() / 8);
}

// ---- MedicalCNN -----------------------------------------------------------------------------

MedicalCNN::MedicalCNN(const MedicalCNNConfig& config, uint64_t seed) : cfg_(config) {
  cfg_.validate();
  std::mt19937_64 rng(seed);

  auto& stem = register_module("stem", std::make_unique<Sequential>());
  stem.emplace<Conv2d>(rng, cfg_.in_channels, cfg_.widths[0], 7, 2, 3, 1, 1, false);
  stem.emplace<BatchNorm2d>(cfg_.widths[0]);
  stem.emplace<ReLU>(/*inplace=*/true);
  stem.emplace<MaxPool2d>(3, 2, 1);
  units_.emplace_back("stem", &stem);

  auto& stages = register_module("stages", std::make_unique<ModuleList>());
  int in = cfg_.widths[0];
  for (size_t i = 0; i < cfg_.widths.size(); ++i) {
    auto& stage = stages.emplace<Sequential>();
    for (int j = 0; j < cfg_.depths[i]; ++j) {
      const int stride = (j == 0 && i > 0) ? 2 : 1;
      auto& block = stage.emplace<BasicResidualBlock>(rng, in, cfg_.widths[i], stride, cfg_.se_reduction);
      units_.emplace_back("stages." + std::to_string(i) + "." + std::to_string(j), &block);
      in = cfg_.widths[i];
    }
  }

  auto& context =
      register_module("context", std::make_unique<ContextBlock>(rng, cfg_.widths.back(), cfg_.resolved_context_width()));
  units_.emplace_back("context", &context);
  auto& pool = register_module("pool", std::make_unique<GlobalAvgPool>());
  units_.emplace_back("pool", &pool);

  auto& head = register_module("head", std::make_unique<Sequential>());
  dropouts_.push_back(&head.emplace<Dropout>(cfg_.dropout[0]));
  head.emplace<Linear>(rng, cfg_.widths.back(), cfg_.head_hidden);
  head.emplace<ReLU>(/*inplace=*/true);
  dropouts_.push_back(&head.emplace<Dropout>(cfg_.dropout[1]));
  head.emplace<Linear>(rng, cfg_.head_hidden, cfg_.num_classes);
  units_.emplace_back("head", &head);

  for (auto& u : units_) chain_.push_back(u.second);
  set_dropout_seed(seed);
}

void MedicalCNN::set_dropout_seed(uint64_t seed) {
  // splitmix64 of (seed, index): independent masks for the two dropouts from one seed.
  for (size_t k = 0; k < dropouts_.size(); ++k) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (k + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    dropouts_[k]->set_seed(z ^ (z >> 31));
  }
}

void MedicalCNN::set_dropout_enabled(bool on) {
  for (Dropout* d : dropouts_) d->set_enabled(on);
}

void MedicalCNN::set_update_running_stats(bool on) {
  apply([on](const std::string&, Module& m) {
    if (auto* bn = dynamic_cast<BatchNorm2d*>(&m)) bn->set_update_running_stats(on);
  });
}

void MedicalCNN::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 4 && x.dim(0) >= 1 && x.dim(1) == cfg_.in_channels,
               "MedicalCNN: expected input [N, " << cfg_.in_channels << ", H, W] with N >= 1, got "
                                                 << x.shape_str());
}

Tensor MedicalCNN::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  return chain_forward(chain_, x, saved, s);
}

Tensor MedicalCNN::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  return chain_backward(chain_, dy, saved, need_input_grad, s);
}

}  // namespace lancet
