// Links relsum_tokenizer alone (no libtorch): proves the tokenizer builds and runs without the model.
//   relsum_tokenizer_test EXPORT_DIR    stdin: a text a line (UTF-8, no escapes); stdout: its token ids
#include <iostream>
#include <stdexcept>
#include <string>

#include "relsum/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: relsum_tokenizer_test EXPORT_DIR < texts\n";
    return 2;
  }
  try {
    const relsum::Tokenizer tok(argv[1]);
    for (std::string line; std::getline(std::cin, line);) {
      const auto ids = tok.encode(line);
      for (std::size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
      std::cout << '\n';
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
