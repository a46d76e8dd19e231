// relsum_rerank: the C++ API from the command line (and the bindings' test driver).
//
//   relsum_rerank EXPORT_DIR [--batch-size N] [--max-tokens N] [--threads N]
//                                                    stdin: QUERY<TAB>DOC a line; stdout: a score a line
//   relsum_rerank EXPORT_DIR --rank [--top-k K]      stdin: the query, then a candidate a line;
//                                                    stdout: CORPUS_ID<TAB>SCORE, best first
//   relsum_rerank EXPORT_DIR --rank --repeat N       also times rank() N times (after one warm-up)
//                                                    and prints the median and p90 to stderr
//   relsum_rerank EXPORT_DIR --tokenize              stdin: a text a line; stdout: its token ids
//   relsum_rerank EXPORT_DIR --encode-pair           stdin: QUERY<TAB>DOC; stdout: the model's ids
//
// Texts are one line each; `\t`, `\n` and `\\` in them stand for a tab, a line break and a backslash.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "relsum/ranker.h"

namespace {

int usage(bool asked = false) {
  (asked ? std::cout : std::cerr)
      << "usage: relsum_rerank EXPORT_DIR [--batch-size N] [--max-tokens N] [--threads N]\n"
         "                                      stdin QUERY<TAB>DOC lines -> a score a line\n"
         "       relsum_rerank EXPORT_DIR --rank [--top-k K] [--repeat N]\n"
         "                                      stdin: the query, then a candidate a line -> CORPUS_ID<TAB>SCORE\n"
         "       relsum_rerank EXPORT_DIR --tokenize       stdin: a text a line -> its token ids\n"
         "       relsum_rerank EXPORT_DIR --encode-pair    stdin: QUERY<TAB>DOC -> the ids the model sees\n"
         "In texts, \\t, \\n and \\\\ stand for a tab, a line break and a backslash.\n";
  return asked ? 0 : 2;
}

std::string unescape(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char c = s[++i];
      out += c == 't' ? '\t' : c == 'n' ? '\n' : c;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::pair<std::string, std::string> split_pair(const std::string& line, std::size_t number) {
  const auto tab = line.find('\t');
  if (tab == std::string::npos || line.find('\t', tab + 1) != std::string::npos)
    throw std::invalid_argument("line " + std::to_string(number) + ": expected QUERY<TAB>DOC");
  return {unescape(line.substr(0, tab)), unescape(line.substr(tab + 1))};
}

void print_ids(const std::vector<int64_t>& ids) {
  for (std::size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
  std::cout << '\n';
}

std::size_t parse_count(const char* s, const char* flag) {
  char* end = nullptr;
  const auto v = std::strtoull(s, &end, 10);  // which reads "-1" as 2^64 - 1: refuse any sign
  if (end == s || *end != '\0' || std::strchr(s, '-') != nullptr || std::strchr(s, '+') != nullptr)
    throw std::invalid_argument(std::string(flag) + " needs a count (digits only), got " + s);
  return static_cast<std::size_t>(v);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) return usage(true);
  if (argc < 2) return usage();
  std::string mode = "predict";
  std::optional<std::size_t> top_k;
  std::size_t batch_size = 128, max_tokens = 2048, repeat = 0, threads = 0;
  try {
    for (int i = 2; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--rank" || a == "--tokenize" || a == "--encode-pair") {
        mode = a.substr(2);
      } else if ((a == "--top-k" || a == "--batch-size" || a == "--max-tokens" || a == "--repeat" ||
                  a == "--threads") && i + 1 < argc) {
        const auto v = parse_count(argv[++i], a.c_str());
        if (a == "--top-k") top_k = v;
        else if (a == "--batch-size") batch_size = v;
        else if (a == "--max-tokens") max_tokens = v;
        else if (a == "--threads") threads = v;
        else repeat = v;
      } else {
        return usage();
      }
    }
    if (top_k && mode != "rank") throw std::invalid_argument("--top-k needs --rank");
    std::vector<std::string> lines;
    for (std::string line; std::getline(std::cin, line);) lines.push_back(line);

    if (mode == "tokenize") {
      const relsum::Tokenizer tok(argv[1]);
      for (const auto& l : lines) print_ids(tok.encode(unescape(l)));
      return 0;
    }
    const relsum::Ranker ranker(argv[1], {1, static_cast<int>(std::min<std::size_t>(threads, 1024))});
    if (mode == "encode-pair") {
      for (std::size_t i = 0; i < lines.size(); ++i) {
        const auto [q, d] = split_pair(lines[i], i + 1);
        print_ids(ranker.encode_pair(q, d));
      }
    } else if (mode == "predict") {
      std::vector<std::pair<std::string, std::string>> pairs;
      for (std::size_t i = 0; i < lines.size(); ++i) pairs.push_back(split_pair(lines[i], i + 1));
      for (const auto s : ranker.predict(pairs, batch_size, max_tokens)) std::printf("%.9g\n", s);
    } else {  // rank
      if (lines.empty()) throw std::invalid_argument("stdin is empty: the first line must be the query");
      const auto query = unescape(lines[0]);
      std::vector<std::string> docs;
      for (std::size_t i = 1; i < lines.size(); ++i) docs.push_back(unescape(lines[i]));
      auto ranked = ranker.rank(query, docs, top_k, batch_size, max_tokens);
      if (repeat > 0) {
        std::vector<double> ms;
        for (std::size_t r = 0; r < repeat; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          ranked = ranker.rank(query, docs, top_k, batch_size, max_tokens);
          ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(ms.begin(), ms.end());
        std::fprintf(stderr, "rank: %zu candidates, %zu runs: median %.3f ms, p90 %.3f ms\n", docs.size(),
                     repeat, ms[ms.size() / 2], ms[std::min(ms.size() - 1, ms.size() * 9 / 10)]);
      }
      for (const auto& r : ranked) std::printf("%zu\t%.9g\n", r.corpus_id, r.score);
    }
  } catch (const std::exception& e) {
    std::cerr << "relsum_rerank: error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
