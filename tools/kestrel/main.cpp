// The `kestrel` command: one binary, subcommands (run, info).
#include <cstdio>

int main() {
  std::puts("kestrel: skeleton");
  return 0;
}
