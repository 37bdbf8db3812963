#include "trainer/weights.h"

#include <set>

namespace lancet {

std::unique_ptr<MedicalCNN> make_model(const Json& model_config, uint64_t seed) {
  const std::string name = model_config.value("name", std::string("medicalcnn"));
  LANCET_CHECK(name == "medicalcnn", "unknown model '" << name << "' (lancet has: medicalcnn)");
  return std::make_unique<MedicalCNN>(MedicalCNNConfig::from_json(model_config), seed);
}

void write_weights(H5File& file, Module& model, const Json& model_config) {
  for (auto& [name, t] : model.state_dict()) file.write("/model/" + name, t->device().is_cpu() ? *t : t->to(Device::cpu()));
  file.set_attr("/model", "model", model_config.dump());
}

void save_weights(const std::string& path, Module& model, const Json& model_config, const Json& run_config) {
  H5File f = H5File::create_atomic(path);
  write_weights(f, model, model_config);
  if (!run_config.is_null()) {
    f.create_group("/train");
    f.set_attr("/train", "config", run_config.dump());
  }
  f.commit();
}

Json read_model_config(const H5File& file) {
  LANCET_CHECK(file.has("/model"), file.path() << ": no /model group (not a lancet/PyTorch weights file)");
  const auto attr = file.get_attr("/model", "model");
  if (!attr) return Json::object();
  try {
    return Json::parse(*attr);
  } catch (const Json::exception& e) {
    LANCET_FAIL(file.path() << ": the /model 'model' attribute is not valid JSON: " << e.what());
  }
}

std::optional<Json> read_run_config(const H5File& file) {
  const auto attr = file.has("/train") ? file.get_attr("/train", "config") : std::nullopt;
  if (!attr) return std::nullopt;
  Json config;
  try {
    config = Json::parse(*attr);
  } catch (const Json::exception& e) {
    LANCET_FAIL(file.path() << ": the /train 'config' attribute is not valid JSON: " << e.what());
  }
  LANCET_CHECK(config.is_object(), file.path() << ": the /train 'config' attribute is " << config.type_name()
                                               << " JSON, expected an object (the run's configuration)");
  return config;
}

void load_weights(const H5File& file, Module& model) {
  LANCET_CHECK(file.has("/model"), file.path() << ": no /model group (not a lancet/PyTorch weights file)");
  auto entries = model.state_dict();
  std::set<std::string> expected;
  for (auto& [name, t] : entries) expected.insert(name);
  for (const std::string& name : file.list("/model")) {
    const bool counter = name.size() > 20 && name.compare(name.size() - 20, 20, ".num_batches_tracked") == 0;
    LANCET_CHECK(counter || expected.count(name), file.path() << ": unexpected entry /model/" << name
                                                              << " (not a parameter or buffer of this model)");
  }
  for (auto& [name, t] : entries) {
    const std::string ds = "/model/" + name;
    LANCET_CHECK(file.has(ds), file.path() << ": missing entry " << ds << " (expected shape " << t->shape_str() << ")");
    const Shape got = file.shape_of(ds);
    LANCET_CHECK(got == t->shape(), file.path() << ": entry " << ds << " has shape " << shape_str(got)
                                                << ", the model expects " << t->shape_str());
  }
  for (auto& [name, t] : entries) {
    Tensor v = file.read("/model/" + name);
    LANCET_CHECK(v.dtype() == DType::f32, file.path() << ": entry /model/" << name << " is " << dtype_name(v.dtype())
                                                      << ", expected float32");
    t->copy_from(t->device().is_cpu() ? v : v.to(t->device()));
  }
  for (auto& [name, p] : model.named_parameters()) ++p->version;  // changed in place
}

std::unique_ptr<MedicalCNN> load_model(const std::string& path) {
  H5File f = H5File::open_read(path);
  auto model = make_model(read_model_config(f), 0);
  load_weights(f, *model);
  return model;
}

}  // namespace lancet
