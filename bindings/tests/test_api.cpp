// The C++ API's own checks, against an export directory given on the command line
// (tests/test_bindings.py builds one from a small random BERT with a real vocabulary).
// Score and tokenisation parity with Python are checked there, through relsum_rerank.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>

#include "relsum/ranker.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// Runs f, expects exception type E whose message contains `needle`.
template <typename E>
void expect_throw(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  try {
    f();
  } catch (const E& e) {
    check(std::string(e.what()).find(needle) != std::string::npos,
          what + ": message `" + e.what() + "` lacks `" + needle + "`");
    return;
  } catch (const std::exception& e) {
    check(false, what + ": wrong exception type: " + e.what());
    return;
  }
  check(false, what + ": no exception");
}

bool is_bf16_export(const std::string& export_dir) {
  std::ifstream settings(std::filesystem::path(export_dir) / "settings.txt");
  for (std::string line; std::getline(settings, line);)
    if (line == "dtype bfloat16") return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: relsum_api_test EXPORT_DIR\n");
    return 2;
  }
  const relsum::Ranker ranker(argv[1]);
  const std::vector<std::string> docs = {
      "stainless steel water bottle, 32 oz, vacuum insulated",
      "",
      "dog food",
      "organic green tea bags, 100 count, caffeine free, non-GMO, individually wrapped for freshness",
      "water bottle",
  };
  const std::string query = "insulated water bottle";

  // rank() agrees with predict(), sorts best first and cuts to top_k.
  std::vector<std::pair<std::string, std::string>> pairs;
  for (const auto& d : docs) pairs.emplace_back(query, d);
  const auto scores = ranker.predict(pairs);
  // How far a score may move with the batch it shares: fp32 sums in another order (~1e-6); a bf16
  // package rounds every activation and the score to 8 bits of mantissa (2-3 ulps seen).
  float largest = 0;
  for (const float s : scores) largest = std::max(largest, std::fabs(s));
  const float tol = is_bf16_export(argv[1]) ? 2e-2f * std::max(largest, 1e-3f) : 1e-5f;
  const auto ranked = ranker.rank(query, docs);
  check(ranked.size() == docs.size(), "rank returns every doc");
  for (std::size_t i = 0; i < ranked.size(); ++i) {
    check(ranked[i].score == scores[ranked[i].corpus_id], "rank score == predict score");
    if (i > 0) check(ranked[i - 1].score >= ranked[i].score, "rank is sorted, best first");
  }
  const auto top2 = ranker.rank(query, docs, 2);
  check(top2.size() == 2 && top2[0].corpus_id == ranked[0].corpus_id && top2[1].corpus_id == ranked[1].corpus_id,
        "top_k keeps the best k");
  check(ranker.rank(query, docs, 100).size() == docs.size(), "top_k above the count keeps all");

  // Batching does not change scores (each batch pads attention to its own longest pair).
  const auto one_by_one = ranker.predict(pairs, 1);
  const auto token_capped = ranker.predict(pairs, 128, 1);  // max_tokens below one pair: one a forward
  const auto one_batch = ranker.predict(pairs, 128, 1 << 20);
  for (std::size_t i = 0; i < scores.size(); ++i) {
    check(std::fabs(one_by_one[i] - scores[i]) < tol, "batch_size 1 gives the same scores");
    check(std::fabs(token_capped[i] - scores[i]) < tol, "max_tokens 1 gives the same scores");
    check(std::fabs(one_batch[i] - scores[i]) < tol, "one forward gives the same scores");
  }

  // Concurrent callers get the same answers, on one model instance and on several.
  for (const std::size_t runners : {1, 3}) {
    const relsum::Ranker pooled(argv[1], {runners, 0});
    std::vector<std::vector<float>> got(4);
    std::vector<std::thread> threads;
    for (auto& g : got) threads.emplace_back([&] { g = pooled.predict(pairs); });
    for (auto& t : threads) t.join();
    for (const auto& g : got) check(g == scores, std::to_string(runners) + " runner(s), four threads at once");
  }

  // num_threads reaches a request thread that ran torch work before the Ranker was built (a thread
  // pool that outlives a model reload): at::set_num_threads in the constructor alone would not.
  {
    std::promise<void> warmed, built;
    const relsum::Ranker* one_thread = nullptr;
    int seen = -1;
    std::thread worker([&] {
      ranker.predict(pairs);  // libtorch's default thread count, fixed in this thread from now on
      warmed.set_value();
      built.get_future().wait();
      one_thread->predict(pairs);
      seen = at::get_num_threads();
    });
    warmed.get_future().wait();
    const int before = at::get_num_threads();
    const relsum::Ranker limited(argv[1], {1, 1});
    // Building a Ranker leaves the building thread's count alone (a service's other torch work there).
    check(at::get_num_threads() == before, "constructing a num_threads 1 Ranker keeps the thread's count " +
                                               std::to_string(before) + " (saw " +
                                               std::to_string(at::get_num_threads()) + ")");
    one_thread = &limited;
    built.set_value();
    worker.join();
    check(seen == 1, "num_threads 1 applies in a request thread that ran torch work before (saw " +
                         std::to_string(seen) + ")");
  }

  // Handing freed memory back: process-wide, at once for threshold 0 (glibc), never for 1 TiB; a Ranker
  // that trims after every call scores the same.
#if defined(__GLIBC__)
  check(relsum::trim_freed_memory(0), "trim_freed_memory(0) trims");
#endif
  check(!relsum::trim_freed_memory(std::size_t{1} << 20), "trim_freed_memory(1 TiB) does not trim");
  {
    relsum::RankerOptions trimming;
    trimming.trim_threshold_mib = 1;
    check(relsum::Ranker(argv[1], trimming).predict(pairs) == scores, "a trimming Ranker scores the same");
  }

  // Truncation: a doc far past max_length is cut to exactly max_length tokens.
  std::string long_doc;
  for (int i = 0; i < 2000; ++i) long_doc += "bottle ";
  check(ranker.encode_pair(query, long_doc).size() == ranker.max_length(), "long doc cut to max_length");
  check(ranker.encode_pair("", "").size() == 3, "empty pair is [CLS] [SEP] [SEP]");
  // The smallest shapes the export allows: one pair of 3 tokens, one candidate.
  const auto lone = ranker.predict({{"", ""}});
  check(lone.size() == 1 && std::isfinite(lone[0]), "a lone empty pair scores");
  const auto single = ranker.rank(query, {docs[0]});
  check(single.size() == 1 && single[0].corpus_id == 0 && std::fabs(single[0].score - scores[0]) < tol,
        "one candidate");

  // Bad input: clear errors, no crash.
  expect_throw<std::invalid_argument>([&] { ranker.rank(query, {}); }, "docs is empty", "empty docs");
  expect_throw<std::invalid_argument>([&] { ranker.predict({}); }, "pairs is empty", "empty pairs");
  expect_throw<std::invalid_argument>([&] { ranker.rank(query, docs, 0); }, "top_k", "top_k 0");
  expect_throw<std::invalid_argument>([&] { ranker.predict(pairs, 0); }, "batch_size", "batch_size 0");
  expect_throw<std::invalid_argument>([&] { ranker.predict(pairs, 8, 0); }, "max_tokens", "max_tokens 0");
  expect_throw<std::invalid_argument>([&] { ranker.rank("caf\xc3", docs); }, "truncated sequence at byte 3",
                                      "truncated UTF-8");
  expect_throw<std::invalid_argument>([&] { ranker.rank(query, {"ok", "\xc0\xaf"}); }, "overlong",
                                      "overlong UTF-8");
  expect_throw<std::invalid_argument>([&] { ranker.tokenizer().encode("\xed\xa0\x80"); }, "surrogate",
                                      "UTF-8 surrogate");
  expect_throw<std::invalid_argument>([&] { ranker.tokenizer().encode("a\xff"); }, "bad lead byte at byte 1",
                                      "bad lead byte");
  expect_throw<std::invalid_argument>([&] { relsum::Ranker(argv[1], {0, 0}); }, "num_runners", "0 runners");
  expect_throw<std::invalid_argument>([&] { relsum::Ranker(argv[1], {1, -2}); }, "num_threads", "-2 threads");
  expect_throw<std::runtime_error>([&] { relsum::Ranker("/nonexistent/relsum-export"); },
                                   "/nonexistent/relsum-export/settings.txt", "missing export directory");

  // A corrupt model.pt2 is a std::runtime_error naming the file, as the header promises (libtorch's
  // loader throws c10::Error, which is not one).
  namespace fs = std::filesystem;
  const auto corrupt = fs::temp_directory_path() /
                       ("relsum_api_test_" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  fs::copy(argv[1], corrupt, fs::copy_options::recursive);
  for (const char* bytes : {"", "not a zip archive"}) {
    std::ofstream(corrupt / "model.pt2", std::ios::binary | std::ios::trunc) << bytes;
    expect_throw<std::runtime_error>([&] { relsum::Ranker r(corrupt.string()); }, (corrupt / "model.pt2").string(),
                                     "corrupt model.pt2 (" + std::to_string(std::string(bytes).size()) + " bytes)");
  }
  fs::remove_all(corrupt);

  if (failures == 0) std::printf("relsum_api_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
