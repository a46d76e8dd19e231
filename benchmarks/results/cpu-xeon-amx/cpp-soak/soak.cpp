// relsum_soak: resident-memory soak of relsum::Ranker under varied request shapes.
//
//   relsum_soak EXPORT_DIR DOCS.txt QUERIES.txt OUT.csv [options]
//     --requests N      requests to run (default 1000)
//     --max-cands N     candidates per request are drawn from 1..N (default 300)
//     --seed S          workload seed (default 1234)
//     --sample N        write a CSV row every N requests (default 10)
//     --trim-every N    malloc_trim(0) after every N-th request (0: never; default 0)
//     --trim-mib M      malloc_trim(0) once RSS grew M MiB past the last trim (0: never; default 0)
//     --threads T       client threads calling rank() concurrently on one Ranker (default 1)
//     --runners R       RankerOptions::num_runners (default 1)
//     --intra N         RankerOptions::num_threads (default 0: libtorch's default)
//     --ranker-trim M   RankerOptions::trim_threshold_mib (0: never; default: the library's, 256)
//
// DOCS.txt / QUERIES.txt: one text a line (make_inputs.py writes them).
// Request i (the same for every run with one seed, whatever the thread count): a query (70% from
// QUERIES.txt, 30% 1-8 random words from the docs), k candidates (1/4 uniform 1..max, 3/4
// log-uniform 1..max), each doc a title-length, medium or long cut (see make_request).
// CSV: requests_done,rss_mib,elapsed_s,trims,heap_free_mib(mallinfo2 fordblks),heap_used_mib,mmap_mib
// stderr at the end: RSS summary, p50/p90 request latency, trim count/total/p50/max.
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "relsum/ranker.h"

namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}

std::vector<std::string> split_words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> w;
  for (std::string x; in >> x;) w.push_back(x);
  return w;
}

std::string first_words(const std::vector<std::string>& w, std::size_t n) {
  std::string out;
  for (std::size_t i = 0; i < std::min(n, w.size()); ++i) out += (i ? " " : "") + w[i];
  return out;
}

double rss_mib() {
  std::ifstream f("/proc/self/statm");
  long size = 0, resident = 0;
  f >> size >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

struct Request {
  std::string query;
  std::vector<std::string> docs;
};

// Deterministic workload: request i depends only on (seed, i).
Request make_request(std::size_t i, std::uint64_t seed, std::size_t max_cands, const std::vector<std::string>& docs,
                     const std::vector<std::vector<std::string>>& doc_words, const std::vector<std::string>& queries,
                     const std::vector<std::size_t>& long_docs) {
  std::mt19937_64 rng(seed * 1000003ULL + i);
  auto uni = [&](std::size_t lo, std::size_t hi) { return std::uniform_int_distribution<std::size_t>(lo, hi)(rng); };
  Request r;
  if (uni(0, 9) < 7) {
    r.query = queries[uni(0, queries.size() - 1)];
  } else {
    const auto n = uni(1, 8);
    for (std::size_t k = 0; k < n; ++k) {
      const auto& w = doc_words[uni(0, doc_words.size() - 1)];
      if (!w.empty()) r.query += (r.query.empty() ? "" : " ") + w[uni(0, w.size() - 1)];
    }
    if (r.query.empty()) r.query = "query";
  }
  // k: a quarter uniform 1..max, the rest log-uniform 1..max (many small requests, some large).
  std::size_t k;
  if (uni(0, 3) == 0) {
    k = uni(1, max_cands);
  } else {
    k = static_cast<std::size_t>(std::exp(std::uniform_real_distribution<double>(0, std::log(max_cands + 0.999))(rng)));
    k = std::clamp<std::size_t>(k, 1, max_cands);
  }
  // Each doc: ~60% a title-length cut (4-20 words), the rest a medium cut (20-100 words), 0-10% (per request) a long one
  // (150-600 words: up to the 512-token cap).  Requests differ in how many of each they get.
  const auto long_share = uni(0, 10);  // per request, percent of long docs 0..10
  r.docs.reserve(k);
  for (std::size_t j = 0; j < k; ++j) {
    const auto d = uni(0, docs.size() - 1);
    const auto p = uni(0, 99);
    if (p < long_share) r.docs.push_back(first_words(doc_words[long_docs[uni(0, long_docs.size() - 1)]], uni(150, 600)));
    else if (p < 65) r.docs.push_back(first_words(doc_words[d], uni(4, 20)));
    else r.docs.push_back(first_words(doc_words[d], uni(20, 150)));
    if (r.docs.back().empty()) r.docs.back() = "x";
  }
  return r;
}

double pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * (v.size() - 1) + 0.5))];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: relsum_soak EXPORT_DIR DOCS.txt QUERIES.txt OUT.csv [--requests N] [--max-cands N] "
                 "[--seed S] [--sample N] [--trim-every N] [--trim-mib M] [--threads T] [--runners R] [--intra N] "
                 "[--ranker-trim M]\n";
    return 2;
  }
  std::size_t requests = 1000, max_cands = 300, sample = 10, trim_every = 0, threads = 1, runners = 1;
  std::uint64_t seed = 1234;
  double trim_mib = 0;
  int intra = 0;
  long long ranker_trim = -1;  // RankerOptions::trim_threshold_mib; -1: the library's default
  for (int i = 5; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const char* v = argv[i + 1];
    if (a == "--requests") requests = std::stoull(v);
    else if (a == "--max-cands") max_cands = std::stoull(v);
    else if (a == "--seed") seed = std::stoull(v);
    else if (a == "--sample") sample = std::stoull(v);
    else if (a == "--trim-every") trim_every = std::stoull(v);
    else if (a == "--trim-mib") trim_mib = std::stod(v);
    else if (a == "--threads") threads = std::stoull(v);
    else if (a == "--runners") runners = std::stoull(v);
    else if (a == "--intra") intra = std::stoi(v);
    else if (a == "--ranker-trim") ranker_trim = std::stoll(v);
    else { std::cerr << "unknown option " << a << "\n"; return 2; }
  }
  const auto docs = read_lines(argv[2]);
  const auto queries = read_lines(argv[3]);
  std::vector<std::vector<std::string>> doc_words;
  doc_words.reserve(docs.size());
  for (const auto& d : docs) doc_words.push_back(split_words(d));
  std::vector<std::size_t> long_docs;  // docs of >= 150 words
  for (std::size_t i = 0; i < docs.size(); ++i)
    if (doc_words[i].size() >= 150) long_docs.push_back(i);
  std::fprintf(stderr, "docs %zu (%zu of >= 150 words), queries %zu\n", docs.size(), long_docs.size(), queries.size());

  const double rss_start = rss_mib();
  const auto t_load = Clock::now();
  relsum::RankerOptions opt;
  opt.num_runners = runners;
  opt.num_threads = intra;
  if (ranker_trim >= 0) opt.trim_threshold_mib = static_cast<std::size_t>(ranker_trim);
  const relsum::Ranker ranker(argv[1], opt);
  const double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
  // One warm-up request (not counted) so "start" is the RSS of a loaded, once-used ranker.
  {
    const auto w = make_request(~std::size_t{0}, seed, 20, docs, doc_words, queries, long_docs);
    ranker.rank(w.query, w.docs);
  }
  const double rss_base = rss_mib();

  std::FILE* csv = std::fopen(argv[4], "w");
  std::fprintf(csv, "requests_done,rss_mib,elapsed_s,trims,heap_free_mib,heap_used_mib,mmap_mib\n");
  auto row = [&](std::size_t done, double elapsed, std::size_t trims) {
    const auto mi = mallinfo2();
    std::fprintf(csv, "%zu,%.1f,%.2f,%zu,%.1f,%.1f,%.1f\n", done, rss_mib(), elapsed, trims, mi.fordblks / 1048576.0,
                 mi.uordblks / 1048576.0, mi.hblkhd / 1048576.0);
    std::fflush(csv);
  };

  std::mutex mu;  // guards csv, stats, trim baseline
  std::vector<double> lat_ms(requests, 0), trim_ms;
  std::vector<std::size_t> cands(requests, 0);
  std::atomic<std::size_t> next{0}, done{0};
  std::size_t trims = 0, errors = 0;
  double peak = rss_base, trim_base = rss_base;
  const auto t0 = Clock::now();
  row(0, 0, 0);

  auto worker = [&]() {
    for (;;) {
      const auto i = next.fetch_add(1);
      if (i >= requests) return;
      const auto req = make_request(i, seed, max_cands, docs, doc_words, queries, long_docs);
      const auto a = Clock::now();
      try {
        const auto ranked = ranker.rank(req.query, req.docs);
        if (ranked.size() != req.docs.size()) throw std::runtime_error("rank() returned the wrong count");
        for (const auto& r : ranked)
          if (!std::isfinite(r.score)) throw std::runtime_error("non-finite score");
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> g(mu);
        ++errors;
        std::cerr << "request " << i << " (" << req.docs.size() << " docs): " << e.what() << "\n";
      }
      lat_ms[i] = std::chrono::duration<double, std::milli>(Clock::now() - a).count();
      cands[i] = req.docs.size();
      const auto n = done.fetch_add(1) + 1;
      std::lock_guard<std::mutex> g(mu);
      const double rss = rss_mib();
      peak = std::max(peak, rss);
      if ((trim_every && n % trim_every == 0) || (trim_mib > 0 && rss - trim_base >= trim_mib)) {
        const auto ta = Clock::now();
        malloc_trim(0);
        trim_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - ta).count());
        ++trims;
        trim_base = rss_mib();
      }
      if (n % sample == 0 || n == requests) row(n, std::chrono::duration<double>(Clock::now() - t0).count(), trims);
    }
  };
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < threads; ++t) pool.emplace_back(worker);
  for (auto& t : pool) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  std::fclose(csv);

  // Latency per candidate (normalises the mix) and for ~100-candidate requests.
  std::vector<double> per_cand, near100;
  for (std::size_t i = 0; i < requests; ++i) {
    per_cand.push_back(lat_ms[i] / static_cast<double>(cands[i]));
    if (cands[i] >= 80 && cands[i] <= 120) near100.push_back(lat_ms[i]);
  }
  double tsum = 0;
  for (auto t : trim_ms) tsum += t;
  std::fprintf(stderr,
               "load %.1fs rss: before-load %.0f after-warmup %.0f end %.0f peak %.0f MiB (end-base %+.0f, peak-base %+.0f)\n"
               "requests %zu threads %zu runners %zu wall %.1fs errors %zu\n"
               "latency ms: p50 %.1f p90 %.1f | per-cand p50 %.3f | 80-120 cands (n=%zu) p50 %.1f\n"
               "trims %zu total %.0f ms p50 %.1f ms max %.1f ms (%.2f%% of wall)\n",
               load_s, rss_start, rss_base, rss_mib(), peak, rss_mib() - rss_base, peak - rss_base, requests, threads,
               runners, wall, errors, pct(lat_ms, 0.5), pct(lat_ms, 0.9), pct(per_cand, 0.5), near100.size(),
               pct(near100, 0.5), trims, tsum, pct(trim_ms, 0.5), trim_ms.empty() ? 0 : *std::max_element(trim_ms.begin(), trim_ms.end()),
               100.0 * tsum / 1000.0 / wall);
  return errors ? 1 : 0;
}
