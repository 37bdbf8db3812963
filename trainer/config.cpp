#include "trainer/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>

#include "data/augment.h"
#include "kernels/device.h"
#include "data/image_dataset.h"
#include "data/loader.h"
#include "data/preprocess.h"
#include "kernels/error.h"
#include "layers/medicalcnn.h"
#include "trainer/schedule.h"

namespace lancet {

Json default_config() {
  Json c = Json::parse(R"({
    "model": {"name": "medicalcnn"},
    "data": {
      "dir": "", "train_split": "train", "val_split": "val",
      "image_size": 64, "channels": 1, "bit_depth": 8, "mean": [0.5], "std": [0.25],
      "synth": {"train": 2000, "val": 500, "size": 128, "seed": 1234},
      "dicom": {"window": null},
      "preprocess": [],
      "workers": 2, "prefetch": 2, "sampler": "shuffle", "on_bad_sample": "error", "cache": true,
      "classes": []
    },
    "train": {
      "epochs": 10, "max_steps": 0, "batch_size": 32, "drop_last": false, "seed": 0,
      "device": "cpu", "threads": 0, "precision": "fp32", "out": "", "log_every": 10,
      "checkpoint_every": 0, "keep_checkpoints": 3, "resume": "", "clip_grad_norm": 0.0,
      "profile": "", "nsys_steps": "", "tensorboard": true, "grad_accum_steps": 1,
      "cudnn_autotune": false, "allow_tf32": false, "memory_format": "auto"
    },
    "amp": {
      "loss_scaling": "auto", "init_scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
      "growth_interval": 2000
    },
    "dist": {
      "backend": "auto", "bucket_mb": 25.0, "overlap": true, "sync_bn": false,
      "timeout_s": 300.0, "bind": "auto", "sampler_drop_last": false
    },
    "pipeline": {
      "stages": 1, "micro_batches": 4, "schedule": "1f1b", "cut": "auto", "balance": "time",
      "threads_per_stage": 0, "devices": []
    },
    "optim": {
      "name": "adam", "lr": 0.001, "weight_decay": 0.0, "momentum": 0.9,
      "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "nesterov": false
    },
    "loss": {"label_smoothing": 0.0, "class_weights": []}
  })");
  // The schedule, early-stopping and augmentation settings document their own defaults.
  c["data"]["augment"] = AugmentConfig{}.to_json();
  c["schedule"] = default_schedule_config();
  c["early_stopping"] = default_early_stopping_config();
  return c;
}

Json default_job_config() {
  Json c = default_config();
  merge_config(c, Json::parse(R"({
    "model": {"widths": [32, 64, 128, 256], "depths": [1, 1, 1, 1], "head_hidden": 128},
    "data": {"synth": {"train": 4000, "val": 1000}}
  })"), "");
  return c;
}

namespace {

std::string keys_of(const Json& obj) {
  std::string s;
  for (auto it = obj.begin(); it != obj.end(); ++it) s += (s.empty() ? "" : ", ") + it.key();
  return s;
}

// Edit distance (insertions, deletions, substitutions) for did-you-mean hints.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// "; did you mean 'x'?" for the closest key of obj when it is close enough, else "".
std::string did_you_mean(const Json& obj, const std::string& key, const std::string& where) {
  std::string best;
  size_t best_d = std::max<size_t>(2, key.size() / 3) + 1;
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    const size_t d = edit_distance(key, it.key());
    if (d < best_d) best_d = d, best = it.key();
  }
  return best.empty() ? "" : "; did you mean '" + (where.empty() ? best : where + "." + best) + "'?";
}

bool compatible(const Json& want, const Json& got) {
  if (want.is_number_float()) return got.is_number();
  if (want.is_number_integer()) return got.is_number_integer();
  if (want.is_boolean()) return got.is_boolean();
  if (want.is_string()) return got.is_string();
  if (want.is_array()) return got.is_array();
  if (want.is_object()) return got.is_object();
  return true;
}

const char* type_word(const Json& j) {
  if (j.is_number_float()) return "a number";
  if (j.is_number_integer()) return "an integer";
  if (j.is_boolean()) return "true or false";
  if (j.is_string()) return "a string";
  if (j.is_array()) return "a list";
  if (j.is_object()) return "a section";
  return "a value";
}

Json yaml_to_json(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined: return nullptr;
    case YAML::NodeType::Sequence: {
      Json a = Json::array();
      for (const auto& e : n) a.push_back(yaml_to_json(e));
      return a;
    }
    case YAML::NodeType::Map: {
      Json o = Json::object();
      for (const auto& kv : n) o[kv.first.as<std::string>()] = yaml_to_json(kv.second);
      return o;
    }
    case YAML::NodeType::Scalar: {
      const std::string s = n.Scalar();
      if (n.Tag() == "!") return s;  // quoted: always a string
      long long i;
      double d;
      bool b;
      if (YAML::convert<long long>::decode(n, i)) return i;
      if (YAML::convert<double>::decode(n, d)) return d;
      if (YAML::convert<bool>::decode(n, b)) return b;
      return s;
    }
  }
  return nullptr;
}

}  // namespace

void merge_config(Json& base, const Json& overlay, const std::string& where) {
  LANCET_CHECK(overlay.is_object(), where << ": expected a mapping of settings");
  for (auto it = overlay.begin(); it != overlay.end(); ++it) {
    const std::string key = where.empty() ? it.key() : where + "." + it.key();
    if (where == "model") {  // the model validates its values; its keys are checked here for the hint
      static const Json model_keys = MedicalCNNConfig{}.to_json();
      LANCET_CHECK(model_keys.contains(it.key()), "unknown setting '" << key << "'"
                                                      << did_you_mean(model_keys, it.key(), where)
                                                      << "; valid keys in model: " << keys_of(model_keys));
      base[it.key()] = it.value();
      continue;
    }
    LANCET_CHECK(base.contains(it.key()), "unknown setting '" << key << "'" << did_you_mean(base, it.key(), where)
                                                              << "; valid keys" << (where.empty() ? "" : " in " + where)
                                                              << ": " << keys_of(base));
    Json& slot = base[it.key()];
    if (slot.is_string() && it.value().is_number_integer()) {  // a folder named 2024, nsys_steps=20...
      slot = it.value().dump();
      continue;
    }
    LANCET_CHECK(compatible(slot, it.value()),
                 "setting '" << key << "' must be " << type_word(slot) << ", got " << it.value().dump());
    if (slot.is_object())
      merge_config(slot, it.value(), key);
    else
      slot = it.value();
  }
}

Json load_yaml_file(const std::string& path) {
  std::ifstream f(path);
  LANCET_CHECK(f.good(), "cannot open config file '" << path << "'");
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    LANCET_FAIL("config file '" << path << "': " << e.what());
  }
  if (root.IsNull()) return Json::object();
  LANCET_CHECK(root.IsMap(), "config file '" << path << "': expected a mapping of sections at the top level");
  return yaml_to_json(root);
}

void apply_override(Json& config, const std::string& assignment) {
  const auto eq = assignment.find('=');
  LANCET_CHECK(eq != std::string::npos && eq > 0, "bad override '" << assignment << "': expected section.key=value");
  const std::string path = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  Json parsed;
  try {
    parsed = yaml_to_json(YAML::Load(value));
  } catch (const YAML::Exception& e) {
    LANCET_FAIL("bad value in override '" << assignment << "': " << e.what());
  }
  if (value.empty()) parsed = "";
  // Build the nested overlay {"a": {"b": value}} and merge it, so the same checks apply.
  Json overlay = parsed;
  std::string rest = path;
  std::vector<std::string> parts;
  for (size_t pos; (pos = rest.find('.')) != std::string::npos; rest = rest.substr(pos + 1))
    parts.push_back(rest.substr(0, pos));
  parts.push_back(rest);
  for (auto it = parts.rbegin(); it != parts.rend(); ++it) overlay = Json{{*it, overlay}};
  // Integers given where a float is expected, and vice versa, are converted by merge rules.
  merge_config(config, overlay, "");
}

namespace {
template <typename T>
T get(const Json& c, const char* section, const char* key) {
  try {
    return c.at(section).at(key).get<T>();
  } catch (const Json::exception& e) {
    LANCET_FAIL("setting '" << section << "." << key << "': " << e.what());
  }
}

// A seed: any non-negative integer (a negative one would wrap to a huge unsigned value).
uint64_t seed_value(const Json& v, const std::string& key) {
  LANCET_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0),
               key << " must be an integer >= 0, got " << v.dump());
  return v.get<uint64_t>();
}
}  // namespace

DataConfig data_config(const Json& c) {
  DataConfig d;
  d.dir = get<std::string>(c, "data", "dir");
  d.train_split = get<std::string>(c, "data", "train_split");
  d.val_split = get<std::string>(c, "data", "val_split");
  d.image_size = get<int>(c, "data", "image_size");
  d.channels = get<int>(c, "data", "channels");
  d.bit_depth = get<int>(c, "data", "bit_depth");
  d.mean = get<std::vector<float>>(c, "data", "mean");
  d.std = get<std::vector<float>>(c, "data", "std");
  const Json& s = c.at("data").at("synth");
  d.synth_train = s.at("train").get<int64_t>();
  d.synth_val = s.at("val").get<int64_t>();
  d.synth_size = s.at("size").get<int>();
  d.synth_seed = seed_value(s.at("seed"), "data.synth.seed");
  LANCET_CHECK(d.synth_train >= 0, "data.synth.train must be >= 0, got " << d.synth_train);
  LANCET_CHECK(d.synth_val >= 0, "data.synth.val must be >= 0, got " << d.synth_val);
  LANCET_CHECK(d.synth_size >= 8, "data.synth.size must be at least 8 (pixels), got " << d.synth_size);
  const Json& w = c.at("data").at("dicom").at("window");
  const bool window_ok = w.is_null() || (w.is_array() && w.size() == 2 && w[0].is_number() && w[1].is_number() &&
                                         w[1].get<double>() >= 1);
  LANCET_CHECK(window_ok, "data.dicom.window must be null (the file's window, else min-max) or [centre, width] with "
                          "width >= 1, got " << w.dump());
  if (!w.is_null()) d.dicom_window = w.get<std::vector<double>>();
  d.preprocess = c.at("data").at("preprocess");
  PreprocessRecipe::from_json(d.preprocess);  // fails here, naming data.preprocess[i], when invalid
  d.augment = c.at("data").at("augment");
  AugmentConfig::from_json(d.augment);  // likewise, naming data.augment.<key>
  d.workers = get<int>(c, "data", "workers");
  d.prefetch = get<int>(c, "data", "prefetch");
  d.sampler = get<std::string>(c, "data", "sampler");
  parse_sampler(d.sampler);
  d.on_bad_sample = get<std::string>(c, "data", "on_bad_sample");
  d.cache = get<bool>(c, "data", "cache");
  // Names; an integer (YAML reads `[0, 1]` as numbers) is taken as its decimal text.
  for (const Json& v : c.at("data").at("classes")) {
    LANCET_CHECK(v.is_string() || v.is_number_integer(),
                 "data.classes must be a list of class names, got " << c.at("data").at("classes").dump());
    d.classes.push_back(v.is_string() ? v.get<std::string>() : v.dump());
  }
  for (size_t i = 0; i < d.classes.size(); ++i) {
    LANCET_CHECK(!d.classes[i].empty(), "data.classes[" << i << "] is an empty name");
    for (size_t j = 0; j < i; ++j)
      LANCET_CHECK(d.classes[j] != d.classes[i], "data.classes names '" << d.classes[i] << "' twice");
  }
  parse_bad_sample(d.on_bad_sample);
  LANCET_CHECK(d.workers >= 0, "data.workers must be >= 0 (0: batches built in the training thread), got " << d.workers);
  LANCET_CHECK(d.prefetch >= 1, "data.prefetch must be >= 1, got " << d.prefetch);
  LANCET_CHECK(d.image_size >= 8, "data.image_size must be at least 8, got " << d.image_size);
  LANCET_CHECK(d.channels == 1 || d.channels == 3, "data.channels must be 1 or 3, got " << d.channels);
  LANCET_CHECK(d.bit_depth == 8 || d.bit_depth == 16, "data.bit_depth must be 8 or 16, got " << d.bit_depth);
  LANCET_CHECK(d.bit_depth == 8 || d.channels == 1,
               "data.bit_depth 16 is for grayscale images (data.channels 1), got data.channels " << d.channels);
  LANCET_CHECK(!d.mean.empty() && !d.std.empty(), "data.mean and data.std need at least one value");
  for (float v : d.std) LANCET_CHECK(v > 0, "data.std values must be positive, got " << v);
  return d;
}

TrainConfig train_config(const Json& c) {
  TrainConfig t;
  t.epochs = get<int>(c, "train", "epochs");
  t.max_steps = get<int64_t>(c, "train", "max_steps");
  t.batch_size = get<int>(c, "train", "batch_size");
  t.drop_last = get<bool>(c, "train", "drop_last");
  t.seed = seed_value(c.at("train").at("seed"), "train.seed");
  t.device = get<std::string>(c, "train", "device");
  t.threads = get<int>(c, "train", "threads");
  t.precision = get<std::string>(c, "train", "precision");
  LANCET_CHECK(t.precision == "fp32" || t.precision == "fp16" || t.precision == "bf16",
               "train.precision must be fp32, fp16 or bf16, got '" << t.precision << "'");
  t.out = get<std::string>(c, "train", "out");
  t.log_every = get<int>(c, "train", "log_every");
  t.checkpoint_every = get<int64_t>(c, "train", "checkpoint_every");
  t.keep_checkpoints = get<int>(c, "train", "keep_checkpoints");
  t.resume = get<std::string>(c, "train", "resume");
  t.clip_grad_norm = get<float>(c, "train", "clip_grad_norm");
  t.profile = get<std::string>(c, "train", "profile");
  t.tensorboard = get<bool>(c, "train", "tensorboard");
  t.grad_accum_steps = get<int>(c, "train", "grad_accum_steps");
  t.cudnn_autotune = get<bool>(c, "train", "cudnn_autotune");
  t.allow_tf32 = get<bool>(c, "train", "allow_tf32");
  t.memory_format = get<std::string>(c, "train", "memory_format");
  LANCET_CHECK(t.memory_format == "auto" || t.memory_format == "nchw" || t.memory_format == "channels_last",
               "train.memory_format must be auto, nchw or channels_last, got '" << t.memory_format << "'");
  LANCET_CHECK(t.grad_accum_steps >= 1, "train.grad_accum_steps must be at least 1, got " << t.grad_accum_steps);
  const std::string nsys = get<std::string>(c, "train", "nsys_steps");
  if (!nsys.empty()) {
    const auto colon = nsys.find(':');
    try {
      LANCET_CHECK(colon != std::string::npos, "");
      size_t used = 0;
      t.nsys_first = std::stoll(nsys.substr(0, colon), &used);
      LANCET_CHECK(used == colon, "");
      t.nsys_last = std::stoll(nsys.substr(colon + 1), &used);
      LANCET_CHECK(used == nsys.size() - colon - 1, "");
    } catch (const std::exception&) {
      LANCET_FAIL("train.nsys_steps must be FIRST:LAST (1-based steps, e.g. 20:30), got '" << nsys << "'");
    }
    LANCET_CHECK(t.nsys_first >= 1 && t.nsys_last >= t.nsys_first,
                 "train.nsys_steps " << nsys << ": need 1 <= FIRST <= LAST");
    // Checked before the build: the same message in CUDA and CPU-only builds. Without a CUDA
    // device cudaProfilerStart fails mid-run (no driver) or captures nothing.
    LANCET_CHECK(parse_device(t.device).is_cuda(), "train.nsys_steps (--nsys-steps) " << nsys
                                                       << " needs a CUDA training device (cudaProfilerStart/Stop), "
                                                          "but train.device is '" << t.device << "'");
#ifndef LANCET_WITH_CUDA
    LANCET_FAIL("train.nsys_steps " << nsys << ": this build has no CUDA (the capture range is cudaProfilerStart/Stop)");
#endif
  }
  LANCET_CHECK(t.clip_grad_norm >= 0, "train.clip_grad_norm must be >= 0 (0 = off), got " << t.clip_grad_norm);
  LANCET_CHECK(t.epochs >= 1, "train.epochs must be at least 1, got " << t.epochs);
  LANCET_CHECK(t.max_steps >= 0, "train.max_steps must be >= 0 (0 = no limit), got " << t.max_steps);
  LANCET_CHECK(t.batch_size >= 1, "train.batch_size must be at least 1, got " << t.batch_size);
  LANCET_CHECK(t.threads >= 0, "train.threads must be >= 0 (0 = all cores), got " << t.threads);
  LANCET_CHECK(t.log_every >= 1, "train.log_every must be at least 1, got " << t.log_every);
  LANCET_CHECK(t.checkpoint_every >= 0,
               "train.checkpoint_every must be >= 0 (0 = at the end of each epoch only), got " << t.checkpoint_every);
  LANCET_CHECK(t.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1, got " << t.keep_checkpoints);
  LANCET_CHECK(t.resume.empty() || !t.out.empty() || t.resume != "auto",
               "train.resume=auto needs a run folder (--out) to look for checkpoints in");
  return t;
}

DistConfig dist_config(const Json& c) {
  DistConfig d;
  d.backend = get<std::string>(c, "dist", "backend");
  d.bucket_mb = get<double>(c, "dist", "bucket_mb");
  d.overlap = get<bool>(c, "dist", "overlap");
  d.sync_bn = get<bool>(c, "dist", "sync_bn");
  d.timeout_s = get<double>(c, "dist", "timeout_s");
  d.bind = get<std::string>(c, "dist", "bind");
  d.sampler_drop_last = get<bool>(c, "dist", "sampler_drop_last");
  LANCET_CHECK(d.backend == "auto" || d.backend == "mpi" || d.backend == "single" || d.backend == "nccl",
               "dist.backend must be auto, mpi, single or nccl, got '" << d.backend << "'");
  LANCET_CHECK(d.bucket_mb > 0, "dist.bucket_mb must be positive, got " << d.bucket_mb);
  LANCET_CHECK(d.bind == "auto" || d.bind == "cores" || d.bind == "none",
               "dist.bind must be auto, cores or none, got '" << d.bind << "'");
  return d;
}

PipelineConfig pipeline_config(const Json& c) {
  PipelineConfig p;
  p.stages = get<int>(c, "pipeline", "stages");
  p.micro_batches = get<int>(c, "pipeline", "micro_batches");
  p.schedule = get<std::string>(c, "pipeline", "schedule");
  p.cut = get<std::string>(c, "pipeline", "cut");
  p.balance = get<std::string>(c, "pipeline", "balance");
  p.threads_per_stage = get<int>(c, "pipeline", "threads_per_stage");
  p.devices = get<std::vector<std::string>>(c, "pipeline", "devices");
  LANCET_CHECK(p.devices.empty() || static_cast<int>(p.devices.size()) == std::max(p.stages, 2),
               "pipeline.devices must be empty (every stage on train.device) or name one device per stage, got "
                   << p.devices.size() << " device(s)");
  for (const std::string& d : p.devices) {
    try {
      parse_device(d);
    } catch (const Error& e) {
      LANCET_FAIL("pipeline.devices: " << e.what());
    }
  }
  LANCET_CHECK(p.stages == 1 || p.stages == 2,
               "pipeline.stages must be 1 (no pipeline) or 2 (two stages), got " << p.stages);
  LANCET_CHECK(p.micro_batches >= 1, "pipeline.micro_batches must be at least 1, got " << p.micro_batches);
  LANCET_CHECK(p.schedule == "gpipe" || p.schedule == "1f1b",
               "pipeline.schedule must be gpipe or 1f1b, got '" << p.schedule << "'");
  LANCET_CHECK(!p.cut.empty(), "pipeline.cut must be auto or the name of the first unit of stage 1 (e.g. stages.2.0)");
  LANCET_CHECK(p.balance == "time" || p.balance == "flops",
               "pipeline.balance must be time or flops, got '" << p.balance << "'");
  LANCET_CHECK(p.threads_per_stage >= 0,
               "pipeline.threads_per_stage must be >= 0 (0 = the rank's threads split evenly), got " << p.threads_per_stage);
  return p;
}

OptimConfig optim_config(const Json& c) {
  OptimConfig o;
  o.name = get<std::string>(c, "optim", "name");
  o.lr = get<float>(c, "optim", "lr");
  o.weight_decay = get<float>(c, "optim", "weight_decay");
  o.momentum = get<float>(c, "optim", "momentum");
  o.beta1 = get<float>(c, "optim", "beta1");
  o.beta2 = get<float>(c, "optim", "beta2");
  o.eps = get<float>(c, "optim", "eps");
  o.nesterov = get<bool>(c, "optim", "nesterov");
  LANCET_CHECK(o.name == "sgd" || o.name == "adam" || o.name == "adamw",
               "optim.name must be sgd, adam or adamw, got '" << o.name << "'");
  LANCET_CHECK(o.lr > 0, "optim.lr must be positive, got " << o.lr);
  LANCET_CHECK(o.weight_decay >= 0, "optim.weight_decay must be >= 0, got " << o.weight_decay);
  LANCET_CHECK(o.momentum >= 0, "optim.momentum must be >= 0, got " << o.momentum);
  LANCET_CHECK(o.beta1 >= 0 && o.beta1 < 1, "optim.beta1 must be in [0, 1), got " << o.beta1);
  LANCET_CHECK(o.beta2 >= 0 && o.beta2 < 1, "optim.beta2 must be in [0, 1), got " << o.beta2);
  LANCET_CHECK(o.eps > 0, "optim.eps must be positive, got " << o.eps);
  return o;
}

LossConfig loss_config(const Json& c) {
  LossConfig l;
  l.label_smoothing = get<float>(c, "loss", "label_smoothing");
  l.class_weights = get<std::vector<float>>(c, "loss", "class_weights");
  LANCET_CHECK(l.label_smoothing >= 0 && l.label_smoothing < 1,
               "loss.label_smoothing must be in [0, 1), got " << l.label_smoothing);
  float weight_sum = 0;
  for (size_t i = 0; i < l.class_weights.size(); ++i) {
    const float w = l.class_weights[i];
    LANCET_CHECK(std::isfinite(w) && w >= 0, "loss.class_weights[" << i << "] must be finite and >= 0, got " << w);
    weight_sum += w;
  }
  LANCET_CHECK(l.class_weights.empty() || weight_sum > 0,
               "loss.class_weights are all zero (no class would count); leave the list empty for unweighted");
  return l;
}

LossScalerConfig loss_scaler_config(const Json& c) {
  const std::string precision = train_config(c).precision;
  const std::string mode = get<std::string>(c, "amp", "loss_scaling");
  LANCET_CHECK(mode == "auto" || mode == "dynamic" || mode == "none",
               "amp.loss_scaling must be auto (dynamic for fp16, none for bf16 / fp32), dynamic or none, got '" << mode
                                                                                                          << "'");
  LossScalerConfig l;
  l.enabled = mode == "dynamic" || (mode == "auto" && precision == "fp16");
  const double init_scale = get<double>(c, "amp", "init_scale");
  LANCET_CHECK(init_scale > 0 && init_scale <= std::numeric_limits<float>::max(),
               "amp.init_scale must be positive and at most " << std::numeric_limits<float>::max()
                                                              << " (the scale is a float), got " << init_scale);
  l.init_scale = static_cast<float>(init_scale);
  l.growth_factor = get<double>(c, "amp", "growth_factor");
  l.backoff_factor = get<double>(c, "amp", "backoff_factor");
  l.growth_interval = get<int64_t>(c, "amp", "growth_interval");
  LANCET_CHECK(l.growth_factor > 1 && std::isfinite(l.growth_factor),
               "amp.growth_factor must be > 1 and finite, got " << l.growth_factor);
  LANCET_CHECK(l.backoff_factor > 0 && l.backoff_factor < 1, "amp.backoff_factor must be in (0, 1), got " << l.backoff_factor);
  LANCET_CHECK(l.growth_interval >= 1, "amp.growth_interval must be at least 1, got " << l.growth_interval);
  return l;
}

std::string cache_dir() {
  if (const char* p = std::getenv("LANCET_CACHE"); p && *p) return p;
  if (const char* p = std::getenv("XDG_CACHE_HOME"); p && *p) return std::string(p) + "/lancet";
  if (const char* p = std::getenv("HOME"); p && *p) return std::string(p) + "/.cache/lancet";
  return "/tmp/lancet-cache";
}

}  // namespace lancet
