// relsum C++ API: score (query, document) pairs with a cross-encoder exported by
// `relsum export-ranker` (an AOTInductor package plus tokenizer tables), no Python at run time.
//
// Same contract as the Python `relsum_core.ranker.CrossEncoder`: a pair is [CLS] query [SEP] doc [SEP];
// the query keeps its first min(query_max_tokens, max_length - 3) tokens and the doc the rest of
// max_length - 3; scores are the raw logits.  libtorch stays behind the pimpl: including this header
// needs no torch headers (linking needs libtorch).
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "relsum/tokenizer.h"

namespace relsum {

struct Ranked {
  std::size_t corpus_id;  // index into the docs given to rank()
  float score;
};

struct RankerOptions {
  // Model instances: up to this many predict()/rank() calls run at once; more wait for one to free.
  std::size_t num_runners = 1;
  // libtorch's intra-op threads of each predict()/rank() call; 0 leaves libtorch's default, one per
  // core.  Each call sets it in its calling thread (at::set_num_threads) where that thread has another
  // count, and does not restore it: the thread keeps it for its later torch work, and libtorch also
  // takes it as the starting count of threads that have not run torch work yet.  (Restoring would
  // also clear oneDNN's primitive cache twice a call.)  Constructing a Ranker sets no thread count.
  // A service running several requests at once wants num_runners x num_threads <= cores.
  int num_threads = 0;
  // After each predict()/rank() call, one that fails while scoring too: trim_freed_memory(this); 0: never.
  std::size_t trim_threshold_mib = 256;
};

// Hands the memory glibc keeps after frees back to the OS (malloc_trim(0)) once the process's resident
// size has grown threshold_mib MiB past where the last trim left it (process-wide, thread-safe); whether
// it trimmed.  Always false off glibc or where /proc/self/statm cannot be read.  Why: requests of new
// shapes leave freed blocks that glibc keeps (the Python CrossEncoder's fp32 grew 1.8 GiB over 1,500
// varied calls untrimmed).  Reading the resident size costs about 20 us, a trim 5-15 ms, and the
// pages it returns fault back in on later calls.
bool trim_freed_memory(std::size_t threshold_mib) noexcept;

class Ranker {
 public:
  // Loads export_dir (model.pt2, vocab.txt, text_rules.tsv, settings.txt).  Throws std::runtime_error
  // naming the file for a missing or malformed one (a corrupt model.pt2 included), a setting out of
  // range or past the model's embeddings (vocab size, max_seqlen, token types: model.pt2 records its
  // own), a CPU lacking a vector extension the package was compiled for (it is built for the
  // exporting CPU), an export format this build does not read, or files of two exports (settings.txt
  // records the export's id, which model.pt2 carries too, and the checksums of vocab.txt and
  // text_rules.tsv), and std::invalid_argument for num_runners 0 or negative num_threads.  On Linux
  // the directory is opened once and every file read through that handle, so an export replaced
  // meanwhile (`relsum export-ranker` swaps the directory) loads whole or fails, never mixed.
  explicit Ranker(const std::string& export_dir, const RankerOptions& options = {});
  ~Ranker();
  Ranker(Ranker&&) noexcept;
  Ranker& operator=(Ranker&&) noexcept;

  // Scores in input order.  Pairs go through the model longest first, at most batch_size pairs and
  // max_tokens padded tokens (pairs x longest pair: attention runs padded) a forward, and always at
  // least one pair.  Forwards of similar lengths pad little: on a 2-core CPU, 100 candidates of
  // 24-96 tokens ran ~10% faster in forwards of 1-4k padded tokens than in one.  A bf16 package's
  // dense layers also run on a few filler rows a forward (Ranker::Impl::padded_tokens).  Throws
  // std::invalid_argument for an empty list, batch_size or max_tokens 0, or text that is not UTF-8, and
  // std::runtime_error naming model.pt2 if the model fails or returns other than one score a pair
  // (only an inconsistent export does).
  // Thread-safe: concurrent calls share RankerOptions::num_runners model instances.
  std::vector<float> predict(const std::vector<std::pair<std::string, std::string>>& pairs,
                             std::size_t batch_size = 128, std::size_t max_tokens = 2048) const;

  // docs sorted by score, highest first (ties: lower corpus_id first), cut to top_k when given.
  // Throws std::invalid_argument for an empty docs list or top_k 0 (std::nullopt keeps every doc).
  std::vector<Ranked> rank(const std::string& query, const std::vector<std::string>& docs,
                           std::optional<std::size_t> top_k = std::nullopt, std::size_t batch_size = 128,
                           std::size_t max_tokens = 2048) const;

  // Token ids of one pair after the truncation rule, with the special tokens (what the model sees).
  std::vector<int64_t> encode_pair(const std::string& query, const std::string& doc) const;

  const Tokenizer& tokenizer() const;
  std::size_t max_length() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace relsum
