// The OpenCL program binary cache (backend/opencl/program_cache.h): a cold build compiles and
// writes the cache file, a warm one loads it, a corrupt or foreign file is rebuilt with a note
// (never an error), a change of source or options is a different entry, and a kernel that fails
// to compile returns its build log. Skips without an OpenCL device (or build).
#ifdef KESTREL_OPENCL

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "backend/opencl/cl_common.h"
#include "backend/opencl/program_cache.h"

namespace kestrel::backend::opencl {
namespace {

namespace fs = std::filesystem;

const char* kSource = "kernel void fill(global int* x, int v) { x[get_global_id(0)] = v; }\n";

class OpenclCache : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = choose_device(-1, 0);
    if (!c) GTEST_SKIP() << "no OpenCL device: " << c.message();
    device_ = c->device;
    cl_int err = CL_SUCCESS;
    context_ = clCreateContext(nullptr, 1, &device_, nullptr, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS);
    dir_ = fs::temp_directory_path() / ("kestrel-cl-cache-test-" + std::to_string(getpid()));
    fs::remove_all(dir_);
  }
  void TearDown() override {
    if (context_) clReleaseContext(context_);
    fs::remove_all(dir_);
  }
  // Builds kSource (plus `extra`) through the cache and checks the kernel runs.
  ProgramBuild build(const std::string& options = "", const std::string& extra = "") {
    auto b = build_program(context_, device_, {kSource, extra}, options, dir_.string());
    EXPECT_TRUE(b.has_value()) << b.message();
    if (!b) return {};
    cl_int err = CL_SUCCESS;
    cl_kernel k = clCreateKernel(b->program, "fill", &err);
    EXPECT_EQ(err, CL_SUCCESS) << "the cached program lacks its kernel";
    if (k) clReleaseKernel(k);
    clReleaseProgram(b->program);
    return *b;
  }
  std::string path(const std::string& options = "", const std::string& extra = "") const {
    return cache_path(dir_.string(), device_, {kSource, extra}, options);
  }
  static std::string read(const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  static void write(const std::string& p, const std::string& data) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
  }

  cl_device_id device_ = nullptr;
  cl_context context_ = nullptr;
  fs::path dir_;
};

TEST_F(OpenclCache, ColdBuildWritesTheFileAndWarmBuildLoadsIt) {
  const ProgramBuild cold = build();
  EXPECT_FALSE(cold.from_cache);
  ASSERT_TRUE(fs::exists(path())) << cold.note;
  EXPECT_NE(cold.note.find("cached in"), std::string::npos) << cold.note;
  const ProgramBuild warm = build();
  EXPECT_TRUE(warm.from_cache) << warm.note;
  EXPECT_GE(warm.ms, 0.0);
  std::printf("[ OpenclCache ] cold %.1f ms, warm %.1f ms\n", cold.ms, warm.ms);
}

TEST_F(OpenclCache, OptionsOrSourceChangesAreOtherEntries) {
  build();
  EXPECT_NE(path("-DX=1"), path());
  EXPECT_NE(path("", "// another kernel source\n"), path());
  EXPECT_FALSE(build("-DX=1").from_cache);
  EXPECT_FALSE(build("", "// another kernel source\n").from_cache);
  EXPECT_TRUE(build("-DX=1").from_cache);
  EXPECT_TRUE(build().from_cache);
}

TEST_F(OpenclCache, CorruptFileIsRebuiltWithANote) {
  build();
  const std::string p = path();
  const std::string good = read(p);
  ASSERT_GT(good.size(), 64u);
  struct Damage {
    const char* what;
    std::string data;
  };
  std::string flipped = good;
  flipped[flipped.size() / 2] ^= 0x5a;
  std::string bad_magic = good;
  bad_magic[0] = 'X';
  const Damage cases[] = {{"a flipped payload byte", flipped},
                          {"truncated", good.substr(0, good.size() - 100)},
                          {"header only", good.substr(0, 20)},
                          {"empty", ""},
                          {"wrong magic", bad_magic}};
  for (const Damage& d : cases) {
    SCOPED_TRACE(d.what);
    write(p, d.data);
    const ProgramBuild b = build();
    EXPECT_FALSE(b.from_cache);
    EXPECT_NE(b.note.find("rebuilt"), std::string::npos) << b.note;
    // Rewritten: a fresh file with the same magic and key (not necessarily the same bytes:
    // Intel's compiler numbers its modules, so two builds of one source differ in a byte), which
    // the next build loads.
    const std::string now = read(p);
    EXPECT_NE(now, d.data) << "the cache file was not rewritten";
    EXPECT_EQ(now.substr(0, 16), good.substr(0, 16)) << "the rewritten file's header differs";
    EXPECT_TRUE(build().from_cache);
  }
}

// A file whose header and checksum are right but whose binary the driver refuses (another
// driver's, or garbage) is rebuilt too.
TEST_F(OpenclCache, BinaryTheDriverRefusesIsRebuilt) {
  build();
  const std::string p = path();
  std::string data = read(p);
  ASSERT_GT(data.size(), 32u);
  std::string payload(data.size() - 32, '\0');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 131 + 7);
  uint64_t h = 1469598103934665603ull;  // the file's FNV-1a checksum of the payload
  for (unsigned char c : payload) h = (h ^ c) * 1099511628211ull;
  for (int i = 0; i < 8; ++i) data[24 + i] = static_cast<char>((h >> (8 * i)) & 0xff);
  data.replace(32, payload.size(), payload);
  write(p, data);
  const ProgramBuild b = build();
  EXPECT_FALSE(b.from_cache);
  EXPECT_NE(b.note.find("rebuilt"), std::string::npos) << b.note;
  EXPECT_TRUE(build().from_cache);
}

TEST_F(OpenclCache, CompileErrorReturnsTheBuildLog) {
  auto b = build_program(context_, device_, {"kernel void broken(global int* x) { x[0] = ; }\n"},
                         "", dir_.string());
  ASSERT_FALSE(b.has_value());
  EXPECT_NE(b.message().find("failed to build"), std::string::npos) << b.message();
  EXPECT_NE(b.message().find("build log"), std::string::npos) << b.message();
  EXPECT_GT(b.message().size(), 120u) << "no log text: " << b.message();
}

TEST_F(OpenclCache, UnwritableCacheDirectoryStillBuilds) {
  fs::create_directories(dir_);
  write((dir_ / "file").string(), "x");
  auto b = build_program(context_, device_, {kSource}, "", (dir_ / "file" / "sub").string());
  ASSERT_TRUE(b.has_value()) << b.message();
  EXPECT_NE(b->note.find("not cached"), std::string::npos) << b->note;
  clReleaseProgram(b->program);
}

}  // namespace
}  // namespace kestrel::backend::opencl

#endif  // KESTREL_OPENCL
