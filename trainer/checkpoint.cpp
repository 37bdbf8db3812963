#include "trainer/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "data/h5file.h"
#include "trainer/weights.h"

namespace lancet {

namespace fs = std::filesystem;

Json TrainState::to_json() const {
  return {{"format", 1},
          {"epoch", epoch},
          {"step_in_epoch", step_in_epoch},
          {"global_step", global_step},
          {"images", images},
          {"train_seconds", train_seconds},
          {"epoch_loss_sum", epoch_loss_sum},
          {"epoch_correct", epoch_correct},
          {"epoch_seen", epoch_seen},
          {"train_size", train_size},
          {"dropout_counters", dropout_counters},
          {"schedule", schedule},
          {"early_stopping", early_stopping},
          {"epoch_skipped", epoch_skipped},
          {"loss_scaler", loss_scaler}};
}

TrainState TrainState::from_json(const Json& j, const std::string& where) {
  TrainState s;
  try {
    LANCET_CHECK(j.at("format").get<int>() == 1,
                 where << ": training state format " << j.at("format") << " is not one this build reads (1)");
    s.epoch = j.at("epoch").get<int>();
    s.step_in_epoch = j.at("step_in_epoch").get<int64_t>();
    s.global_step = j.at("global_step").get<int64_t>();
    s.images = j.at("images").get<int64_t>();
    s.train_seconds = j.at("train_seconds").get<double>();
    s.epoch_loss_sum = j.at("epoch_loss_sum").get<double>();
    s.epoch_correct = j.at("epoch_correct").get<int64_t>();
    s.epoch_seen = j.at("epoch_seen").get<int64_t>();
    s.train_size = j.at("train_size").get<int64_t>();
    s.dropout_counters = j.at("dropout_counters").get<std::vector<uint64_t>>();
    s.schedule = j.at("schedule");
    s.early_stopping = j.at("early_stopping");
    // Written since mixed precision; absent in older checkpoints (fp32 runs: nothing to restore).
    s.epoch_skipped = j.value("epoch_skipped", int64_t{0});
    s.loss_scaler = j.value("loss_scaler", Json::object());
  } catch (const Json::exception& e) {
    LANCET_FAIL(where << ": damaged training state: " << e.what());
  }
  return s;
}

void save_checkpoint(const std::string& path, MedicalCNN& model, const Json& model_config, Optimizer& opt,
                     const std::string& optimizer_name, const TrainState& state, const Json& config) {
  H5File f = H5File::create_atomic(path);
  write_weights(f, model, model_config);
  for (auto& [name, t] : opt.state()) f.write("/optimizer/" + name, t->device().is_cpu() ? *t : t->to(Device::cpu()));
  f.create_group("/optimizer");
  f.set_attr("/optimizer", "state", Json{{"name", optimizer_name}, {"steps", opt.steps()}, {"lr", opt.lr()}}.dump());
  f.create_group("/train");
  f.set_attr("/train", "state", state.to_json().dump());
  f.set_attr("/train", "config", config.dump());
  f.commit();
}

namespace {

// "section.key" -> value for every leaf of a config tree.
void flatten(const Json& j, const std::string& prefix, std::map<std::string, Json>& out) {
  if (j.is_object() && !(prefix == "model")) {
    for (auto it = j.begin(); it != j.end(); ++it) flatten(it.value(), prefix.empty() ? it.key() : prefix + "." + it.key(), out);
  } else {
    out[prefix] = j;  // the model section is compared whole
  }
}

// What a resumed run may set differently: how long, where, how verbosely — and how the work is
// spread (any rank count resumes any checkpoint: the dist section and the accumulation split;
// pipelined and unpipelined runs resume each other: the pipeline section;
// any loader thread count: batches do not depend on it; CPU and GPU runs resume each other).
bool may_change_on_resume(const std::string& key) {
  static const std::set<std::string> keys{
      "train.epochs",     "train.max_steps", "train.out",         "train.threads",    "train.log_every",
      "train.checkpoint_every", "train.keep_checkpoints", "train.resume", "train.profile", "train.nsys_steps",
      "train.tensorboard", "train.grad_accum_steps", "train.device", "train.cudnn_autotune", "train.allow_tf32",
      "data.workers", "data.prefetch", "data.cache"};
  return keys.count(key) > 0 || key.rfind("dist.", 0) == 0 || key.rfind("pipeline.", 0) == 0;
}

Json read_json_attr(const H5File& f, const std::string& object, const std::string& attr) {
  const auto s = f.has(object) ? f.get_attr(object, attr) : std::nullopt;
  LANCET_CHECK(s.has_value(), f.path() << ": not a training checkpoint (no '" << attr << "' attribute on " << object
                                       << "; a weights-only file cannot resume a run)");
  try {
    return Json::parse(*s);
  } catch (const Json::exception& e) {
    LANCET_FAIL(f.path() << ": the '" << attr << "' attribute of " << object << " is not valid JSON: " << e.what());
  }
}

}  // namespace

TrainState load_checkpoint(const std::string& path, MedicalCNN& model, Optimizer& opt,
                           const std::string& optimizer_name, const Json& config) {
  H5File f = H5File::open_read(path);
  // The state first: a final.h5 holds the run's config too (weights.h) but cannot resume it.
  const TrainState state = TrainState::from_json(read_json_attr(f, "/train", "state"), path);
  const Json saved_config = read_json_attr(f, "/train", "config");
  std::map<std::string, Json> was, now, defaults;
  flatten(saved_config, "", was);
  flatten(config, "", now);
  flatten(default_config(), "", defaults);
  for (const auto& [key, value] : now) {
    if (may_change_on_resume(key)) continue;
    const auto it = was.find(key);
    // A setting newer than the checkpoint: fine while this run keeps its default (what the
    // older lancet did).
    const auto def = defaults.find(key);
    if (it == was.end() && def != defaults.end() && def->second == value) continue;
    const std::string there = it == was.end() ? "absent" : it->second.dump();
    LANCET_CHECK(it != was.end() && it->second == value,
                 path << ": cannot resume: " << key << " is " << there << " in the checkpoint but " << value.dump()
                      << " in this run");
  }
  const Json opt_state = read_json_attr(f, "/optimizer", "state");
  LANCET_CHECK(opt_state.value("name", std::string()) == optimizer_name,
               path << ": cannot resume: the optimizer there is " << opt_state.value("name", std::string("?"))
                    << ", here " << optimizer_name);
  const auto& dropouts = model.dropouts();
  LANCET_CHECK(state.dropout_counters.size() == dropouts.size(),
               path << ": damaged training state: " << state.dropout_counters.size() << " dropout counters for "
                    << dropouts.size() << " dropout layers");

  load_weights(f, model);
  for (auto& [name, t] : opt.state()) {
    const std::string ds = "/optimizer/" + name;
    LANCET_CHECK(f.has(ds), path << ": missing optimizer entry " << ds);
    LANCET_CHECK(f.shape_of(ds) == t->shape(), path << ": optimizer entry " << ds << " has shape "
                                                    << shape_str(f.shape_of(ds)) << ", expected " << t->shape_str());
    const Tensor v = f.read(ds);
    t->copy_from(t->device().is_cpu() ? v : v.to(t->device()));
  }
  try {
    opt.set_steps(opt_state.at("steps").get<int64_t>());
    opt.set_lr(opt_state.at("lr").get<float>());
  } catch (const Json::exception& e) {
    LANCET_FAIL(path << ": damaged optimizer state: " << e.what());
  }
  for (size_t i = 0; i < dropouts.size(); ++i) dropouts[i]->set_counter(state.dropout_counters[i]);
  return state;
}

std::string checkpoint_dir(const std::string& out) { return out + "/checkpoints"; }

std::string checkpoint_path(const std::string& out, int64_t global_step) {
  char name[40];
  std::snprintf(name, sizeof(name), "step-%09lld.h5", static_cast<long long>(global_step));
  return checkpoint_dir(out) + "/" + name;
}

std::vector<std::string> list_checkpoints(const std::string& out) {
  std::vector<std::string> files;
  std::error_code ec;
  if (!fs::is_directory(checkpoint_dir(out), ec)) return files;
  for (const auto& e : fs::directory_iterator(checkpoint_dir(out))) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file() && name.rfind("step-", 0) == 0 && e.path().extension() == ".h5")
      files.push_back(e.path().string());
  }
  std::sort(files.begin(), files.end());  // zero-padded step numbers: name order is step order
  return files;
}

std::string newest_valid_checkpoint(const std::string& out, std::ostream& log) {
  const auto files = list_checkpoints(out);
  for (auto it = files.rbegin(); it != files.rend(); ++it) {
    try {
      H5File f = H5File::open_read(*it);
      TrainState::from_json(read_json_attr(f, "/train", "state"), *it);
      read_json_attr(f, "/train", "config");
      return *it;
    } catch (const Error& e) {
      log << "skipping checkpoint " << *it << ": " << e.what() << "\n";
    }
  }
  return "";
}

std::vector<std::string> remove_stale_temp_files(const std::string& out) {
  std::vector<std::string> removed;
  const auto h5 = [](const std::string& base) { return fs::path(base).extension() == ".h5"; };
  for (const std::string& dir : {out, checkpoint_dir(out)}) {
    const auto here = remove_dead_writers_temp_files(dir, h5);
    removed.insert(removed.end(), here.begin(), here.end());
  }
  return removed;
}

void prune_checkpoints(const std::string& out, int keep) {
  const auto files = list_checkpoints(out);
  for (size_t i = 0; i + static_cast<size_t>(keep) < files.size(); ++i) {
    std::error_code ec;
    fs::remove(files[i], ec);
  }
}

}  // namespace lancet
