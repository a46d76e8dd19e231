#include "relsum/ranker.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <mutex>
#include <new>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

#include "export_dir.h"

#if defined(__GLIBC__)
#include <malloc.h>
#include <unistd.h>
#endif

namespace relsum {
namespace {

// The package path, checked first: the loader's own error for a missing file names nothing useful.
std::string package_path(const detail::ExportDir& dir) {
  if (!std::ifstream(dir.open_path("model.pt2"))) throw std::runtime_error("relsum: cannot read " + dir.path("model.pt2"));
  return dir.path("model.pt2");
}

struct Encoded {
  std::vector<int64_t> ids;
  std::size_t first_type1;  // index of the first token of token type 1
};

// This CPU's flags line of /proc/cpuinfo, split; empty where there is none (off Linux).
std::vector<std::string> cpu_flags() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    return {std::istream_iterator<std::string>(words), std::istream_iterator<std::string>()};
  }
  return {};
}

// The process's resident size in MiB (Linux's /proc/self/statm); negative where it cannot be read.
double resident_mib() {
#if defined(__GLIBC__)
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return -1;
  long long size = 0, resident = -1;
  const bool read = std::fscanf(f, "%lld %lld", &size, &resident) == 2;
  std::fclose(f);
  return read ? static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1 << 20) : -1;
#else
  return -1;
#endif
}

std::mutex trim_mutex;
double trim_base = -1;  // the resident size after the last trim (or the lowest seen since): process-wide

}  // namespace

bool trim_freed_memory(std::size_t threshold_mib) noexcept {
#if defined(__GLIBC__)
  // A call that finds another checking or trimming leaves it to that one: none waits out a trim.
  const std::unique_lock lock(trim_mutex, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  const double resident = resident_mib();
  if (resident < 0) return false;
  if (trim_base < 0 || resident < trim_base) trim_base = resident;
  if (resident - trim_base < static_cast<double>(threshold_mib)) return false;
  malloc_trim(0);
  trim_base = resident_mib();
  return true;
#else
  (void)threshold_mib;
  return false;
#endif
}

struct Ranker::Impl {
  // Every setting is range-checked before the package loads: a bad one would otherwise index past
  // the embeddings or the exported shapes, or wrap around as a size.
  Impl(const detail::ExportDir& dir, std::size_t num_runners, int num_threads)
      : settings(dir),
        tokenizer(dir),
        package(package_path(dir)),
        max_packed_tokens(settings.count("max_packed_tokens", 3)),
        max_batch(settings.count("max_batch", 1)),
        max_seqlen(settings.count("max_seqlen", 3, max_packed_tokens, "max_packed_tokens")),
        max_length(settings.count("max_length", 3, max_seqlen, "the package's longest pair, max_seqlen")),
        query_max_tokens(settings.count("query_max_tokens")),
        cls_id(token_id("cls_id")),
        sep_id(token_id("sep_id")),
        two_types(settings.count("two_token_types", 0, 1) != 0),
        pad_tokens(settings.all("dtype") != std::vector<std::string>{"float32"}),
        num_threads(num_threads) {
    try {
      loader.emplace(dir.open_path("model.pt2"), "model", /*run_single_threaded=*/false, num_runners);
    } catch (const std::exception& e) {  // c10::Error for a corrupt package: not a std::runtime_error
      throw std::runtime_error("relsum: " + package + ": cannot load the AOTInductor package: " + message(e));
    }
    check_package();
  }

  // The package's own record of its embeddings and of the CPU it was compiled for (export.py,
  // package_metadata).  Inside the model an id or position past its embeddings aborts the process
  // (the bounds check throws inside an OpenMP region), and a missing instruction set is a SIGILL.
  void check_package() {
    const auto meta = loader->get_metadata();
    // First: files of two exports also fail the checks below, with a misleading message.
    const auto id = meta.find("relsum_export_id");
    if (id == meta.end() || id->second.empty())
      throw std::runtime_error("relsum: " + package + ": its metadata lacks `relsum_export_id`: not a package of " +
                               "`relsum export-ranker` format " + std::to_string(detail::kFormatVersion));
    if (id->second != settings.export_id())
      throw std::runtime_error("relsum: " + package + ": the export changed while loading: settings.txt is export " +
                               settings.export_id() + ", model.pt2 is export " + id->second +
                               "; load it again (files copied between exports: export again)");
    const auto rows = [&](const std::string& key) -> std::size_t {
      const auto it = meta.find(key);
      std::size_t used = 0, value = 0;
      if (it != meta.end()) {
        try {
          value = std::stoull(it->second, &used);
        } catch (const std::exception&) {
          used = 0;
        }
      }
      if (it == meta.end() || used == 0 || used != it->second.size())
        throw std::runtime_error("relsum: " + package + ": its metadata lacks a valid `" + key +
                                 "`: not a package of `relsum export-ranker` format " +
                                 std::to_string(detail::kFormatVersion));
      return value;
    };
    const auto words = rows("relsum_word_rows");
    if (tokenizer.vocab_size() > words)
      throw std::runtime_error("relsum: " + package + ": the export's vocab.txt has " +
                               std::to_string(tokenizer.vocab_size()) + " tokens, more than this model's " +
                               std::to_string(words) + " embedding rows (files from different exports?)");
    const auto positions = rows("relsum_position_rows");
    if (max_seqlen > positions)
      throw std::runtime_error("relsum: " + settings.path() + ": `max_seqlen` is " + std::to_string(max_seqlen) +
                               ", more than the model's " + std::to_string(positions) + " position embeddings");
    if (two_types && rows("relsum_type_rows") < 2)
      throw std::runtime_error("relsum: " + settings.path() +
                               ": `two_token_types` is 1 but the model has one token type embedding");
    const auto it = meta.find("relsum_cpu_flags");
    const auto have = cpu_flags();
    if (it == meta.end() || have.empty()) return;  // nothing recorded, or nothing to compare with
    std::istringstream need(it->second);
    std::string missing;
    for (std::string flag; need >> flag;)
      if (std::find(have.begin(), have.end(), flag) == have.end()) missing += " " + flag;
    if (!missing.empty())
      throw std::runtime_error("relsum: " + package + " was compiled for a CPU with" + missing +
                               ", which this CPU lacks; export it again with --target x86-64-v3, or on this kind of machine");
  }

  int64_t token_id(const std::string& key) const {
    return static_cast<int64_t>(settings.count(key, 0, tokenizer.vocab_size() - 1, "an id of vocab.txt"));
  }

  // c10::Error's what(), and the runner's std::runtime_error copy of it, carry a C++ backtrace: keep
  // the message alone.
  static std::string message(const std::exception& e) {
    const auto* c10 = dynamic_cast<const c10::Error*>(&e);
    const std::string m = c10 ? c10->what_without_backtrace() : e.what();
    return m.substr(0, m.find("\nException raised from"));
  }

  // The truncation rule on token ids without specials (relsum_core.ranker.truncate_pair).
  Encoded cut(const std::vector<int64_t>& q, const std::vector<int64_t>& d) const {
    const auto budget = max_length - 3;
    const auto nq = std::min({q.size(), query_max_tokens, budget});
    const auto nd = std::min(d.size(), budget - nq);
    Encoded e;
    e.ids.reserve(nq + nd + 3);
    e.ids.push_back(cls_id);
    e.ids.insert(e.ids.end(), q.begin(), q.begin() + static_cast<std::ptrdiff_t>(nq));
    e.ids.push_back(sep_id);
    e.ids.insert(e.ids.end(), d.begin(), d.begin() + static_cast<std::ptrdiff_t>(nd));
    e.ids.push_back(sep_id);
    e.first_type1 = two_types ? nq + 2 : e.ids.size();
    return e;
  }

  // A bf16 package's token stream is padded with rows no sequence attends to (id 0, position 0, type
  // 0), to a multiple of 1/16 of T's power of two, 8 at least and 64 at most: 7 filler rows at most
  // below 128 tokens, a 16th of the stream at most above, and about 16 distinct row counts an octave.
  // The linears then see few shapes, and oneDNN, which builds and caches a kernel per shape, reuses
  // them.  On the AMX Xeon, 250 varied bf16 requests took 59.7 s instead of 79.1 s and grew the
  // process 535 MiB instead of 1.0 GiB (the default trim on in both).  A multiple of 64 throughout was
  // as fast but took one 16-token pair 4.8 ms instead of 2.6.  fp32 (MKL, no per-shape kernels) gained
  // nothing and stays exact.
  int64_t padded_tokens(int64_t T) const {
    if (!pad_tokens) return T;
    int64_t octave = 1;
    while (octave * 2 <= T) octave *= 2;
    const int64_t step = std::clamp<int64_t>(octave / 16, 8, 64);
    return std::min<int64_t>((T + step - 1) / step * step, static_cast<int64_t>(max_packed_tokens));
  }

  // The exported model's six inputs for these sequences (relsum_core/export.py: export_inputs).
  std::vector<float> score(const std::vector<const Encoded*>& seqs) {
    const auto B = static_cast<int64_t>(seqs.size());
    int64_t T = 0, L = 0;
    for (const auto* s : seqs) {
      T += static_cast<int64_t>(s->ids.size());
      L = std::max<int64_t>(L, static_cast<int64_t>(s->ids.size()));
    }
    T = padded_tokens(T);
    const auto opts = at::TensorOptions().dtype(at::kLong);
    auto ids = at::zeros({T}, opts), types = at::zeros({T}, opts), pos = at::zeros({T}, opts);
    auto pad_index = at::full({B, L}, T, opts), slot = at::zeros({T}, opts), cls = at::empty({B}, opts);
    auto* pi = ids.data_ptr<int64_t>();
    auto* pt = types.data_ptr<int64_t>();
    auto* pp = pos.data_ptr<int64_t>();
    auto* pad = pad_index.data_ptr<int64_t>();
    auto* ps = slot.data_ptr<int64_t>();
    auto* pc = cls.data_ptr<int64_t>();
    int64_t t = 0;
    for (int64_t b = 0; b < B; ++b) {
      const auto& s = *seqs[static_cast<std::size_t>(b)];
      pc[b] = t;
      for (std::size_t j = 0; j < s.ids.size(); ++j, ++t) {
        pi[t] = s.ids[j];
        pt[t] = j >= s.first_type1 ? 1 : 0;
        pp[t] = static_cast<int64_t>(j);
        pad[b * L + static_cast<int64_t>(j)] = t;
        ps[t] = b * L + static_cast<int64_t>(j);
      }
    }
    std::vector<at::Tensor> out;
    {
      c10::InferenceMode guard;
      // The package's model container hands each concurrent call its own model instance.
      try {
        out = loader->run({ids, types, pos, pad_index, slot, cls});
      } catch (const std::bad_alloc&) {
        throw;
      } catch (const std::exception& e) {  // a failure inside the package that it reports by throwing
        throw std::runtime_error("relsum: " + package + ": the model failed: " + message(e));
      }
    }
    // A package from another export (or hand-swapped) may answer with another shape: never read past it.
    if (out.empty() || out[0].numel() != B)
      throw std::runtime_error("relsum: " + package + ": the model returned " +
                               (out.empty() ? std::string("no output") : std::to_string(out[0].numel()) + " scores") +
                               " for " + std::to_string(B) + " pairs: not a package of `relsum export-ranker`");
    const auto scores = out[0].to(at::kFloat).contiguous();
    const auto* p = scores.data_ptr<float>();
    return std::vector<float>(p, p + B);
  }

  // In initialisation order: each bound is checked against those before it.
  detail::Settings settings;
  Tokenizer tokenizer;
  std::string package;
  std::size_t max_packed_tokens, max_batch, max_seqlen, max_length, query_max_tokens;
  int64_t cls_id, sep_id;
  bool two_types;
  bool pad_tokens;  // see padded_tokens
  int num_threads;  // 0: libtorch's default
  std::size_t trim_threshold_mib = 0;  // 0: never trims
  std::optional<torch::inductor::AOTIModelPackageLoader> loader;  // loaded last, once the settings pass
};

Ranker::Ranker(const std::string& export_dir, const RankerOptions& options) {
  if (options.num_runners == 0) throw std::invalid_argument("relsum: num_runners must be >= 1");
  if (options.num_threads < 0) throw std::invalid_argument("relsum: num_threads must be >= 0");
  const detail::ExportDir dir(export_dir);  // open for the load only: closed once it is done
  impl_ = std::make_unique<Impl>(dir, options.num_runners, options.num_threads);
  impl_->trim_threshold_mib = options.trim_threshold_mib;
}
Ranker::~Ranker() = default;
Ranker::Ranker(Ranker&&) noexcept = default;
Ranker& Ranker::operator=(Ranker&&) noexcept = default;

const Tokenizer& Ranker::tokenizer() const { return impl_->tokenizer; }
std::size_t Ranker::max_length() const { return impl_->max_length; }

std::vector<int64_t> Ranker::encode_pair(const std::string& query, const std::string& doc) const {
  return impl_->cut(impl_->tokenizer.encode(query), impl_->tokenizer.encode(doc)).ids;
}

std::vector<float> Ranker::predict(const std::vector<std::pair<std::string, std::string>>& pairs,
                                   std::size_t batch_size, std::size_t max_tokens) const {
  if (pairs.empty()) throw std::invalid_argument("relsum: pairs is empty: nothing to score");
  if (batch_size == 0) throw std::invalid_argument("relsum: batch_size must be >= 1");
  if (max_tokens == 0) throw std::invalid_argument("relsum: max_tokens must be >= 1");
  batch_size = std::min(batch_size, impl_->max_batch);
  max_tokens = std::min(max_tokens, impl_->max_packed_tokens);  // padded >= packed: within the export
  // Trims on the way out, a throw included: a forward that failed mid-way freed its activations too.
  struct TrimOnExit {
    std::size_t threshold_mib;
    ~TrimOnExit() {
      if (threshold_mib > 0) trim_freed_memory(threshold_mib);
    }
  } const trim_on_exit{impl_->trim_threshold_mib};
  // at::set_num_threads reaches only threads that have not run torch work yet: set it per calling thread.
  if (impl_->num_threads > 0 && at::get_num_threads() != impl_->num_threads) at::set_num_threads(impl_->num_threads);
  std::vector<Encoded> enc;
  enc.reserve(pairs.size());
  std::unordered_map<std::string_view, std::vector<int64_t>> query_ids;  // each query tokenised once
  for (const auto& [q, d] : pairs) {
    auto it = query_ids.find(q);
    if (it == query_ids.end()) it = query_ids.emplace(q, impl_->tokenizer.encode(q)).first;
    enc.push_back(impl_->cut(it->second, impl_->tokenizer.encode(d)));
  }
  // A pair whose ids repeat an earlier one's is scored once and copied: identical documents then tie
  // exactly (a score can depend on its row in a batch of mixed lengths), and rank() keeps them in
  // corpus_id order, as Python does.
  // The key holds where token type 1 starts too: "a [SEP] b" + "c" and "a" + "b [SEP] c" share ids.
  std::vector<std::size_t> first(enc.size());
  std::unordered_map<std::string, std::size_t> seen;
  std::vector<std::size_t> order;
  for (std::size_t i = 0; i < enc.size(); ++i) {
    std::string key(reinterpret_cast<const char*>(enc[i].ids.data()), enc[i].ids.size() * sizeof(int64_t));
    key.append(reinterpret_cast<const char*>(&enc[i].first_type1), sizeof(enc[i].first_type1));
    const auto [it, fresh] = seen.emplace(std::move(key), i);
    first[i] = it->second;
    if (fresh) order.push_back(i);
  }
  // Longest first: each batch pads its attention to its own longest pair.
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return enc[a].ids.size() > enc[b].ids.size(); });
  std::vector<float> scores(enc.size());
  for (std::size_t i = 0; i < order.size();) {
    const auto longest = enc[order[i]].ids.size();  // sorted: the batch's first pair is its longest
    std::vector<const Encoded*> batch;
    std::size_t j = i;
    for (; j < order.size() && batch.size() < batch_size; ++j) {
      if (!batch.empty() && (batch.size() + 1) * longest > max_tokens) break;
      batch.push_back(&enc[order[j]]);
    }
    const auto s = impl_->score(batch);
    for (std::size_t k = 0; k < s.size(); ++k) scores[order[i + k]] = s[k];
    i = j;
  }
  for (std::size_t i = 0; i < enc.size(); ++i) scores[i] = scores[first[i]];
  return scores;
}

std::vector<Ranked> Ranker::rank(const std::string& query, const std::vector<std::string>& docs,
                                 std::optional<std::size_t> top_k, std::size_t batch_size,
                                 std::size_t max_tokens) const {
  if (docs.empty()) throw std::invalid_argument("relsum: docs is empty: nothing to rank");
  if (top_k && *top_k == 0) throw std::invalid_argument("relsum: top_k must be >= 1 (std::nullopt keeps every doc)");
  std::vector<std::pair<std::string, std::string>> pairs;
  pairs.reserve(docs.size());
  for (const auto& d : docs) pairs.emplace_back(query, d);
  const auto scores = predict(pairs, batch_size, max_tokens);
  std::vector<Ranked> ranked(scores.size());
  for (std::size_t i = 0; i < scores.size(); ++i) ranked[i] = {i, scores[i]};
  std::stable_sort(ranked.begin(), ranked.end(), [](const Ranked& a, const Ranked& b) { return a.score > b.score; });
  if (top_k && *top_k < ranked.size()) ranked.resize(*top_k);
  return ranked;
}

}  // namespace relsum
