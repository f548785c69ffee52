#include "backend/opencl/program_cache.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace kestrel::backend::opencl {

namespace {

// File layout: magic, key hash, payload size, payload checksum (all little-endian u64 after the
// 8-byte magic), then the driver's program binary.
constexpr char kMagic[8] = {'K', 'C', 'L', 'B', 'I', 'N', '0', '1'};
constexpr size_t kHeaderBytes = 8 + 3 * 8;

struct Fnv64 {
  uint64_t h = 1469598103934665603ull;
  void add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  void add(const std::string& s) {
    const uint64_t n = s.size();
    add(&n, sizeof n);  // length first: ("ab", "c") and ("a", "bc") differ
    add(s.data(), s.size());
  }
};

uint64_t key_of(cl_device_id device, const std::vector<std::string>& sources,
                const std::string& options) {
  Fnv64 f;
  f.add(std::string("kestrel-opencl-cache-v1"));
  cl_platform_id platform = device_value<cl_platform_id>(device, CL_DEVICE_PLATFORM);
  f.add(platform ? platform_string(platform, CL_PLATFORM_VERSION) : std::string());
  f.add(device_string(device, CL_DEVICE_NAME));
  f.add(device_string(device, CL_DEVICE_VENDOR));
  f.add(device_string(device, CL_DEVICE_VERSION));
  f.add(device_string(device, CL_DRIVER_VERSION));
  f.add(options);
  for (const std::string& s : sources) f.add(s);
  return f.h;
}

void put_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t get_u64(const std::string& in, size_t at) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v |= static_cast<uint64_t>(static_cast<unsigned char>(in[at + i])) << (8 * i);
  return v;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

std::string build_log(cl_program program, cl_device_id device) {
  size_t n = 0;
  if (clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n) != CL_SUCCESS)
    return "(no build log)";
  std::string log(n, '\0');
  if (clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr) !=
      CL_SUCCESS)
    return "(no build log)";
  while (!log.empty() && (log.back() == '\0' || log.back() == '\n')) log.pop_back();
  return log;
}

// The payload of a cache file, or an explanation of why it cannot be used.
Expected<std::string> read_entry(const std::string& path, uint64_t key) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return error("missing");
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (data.size() < kHeaderBytes || std::memcmp(data.data(), kMagic, 8) != 0)
    return error("not a Kestrel program cache file");
  if (get_u64(data, 8) != key) return error("its key does not match");
  const uint64_t size = get_u64(data, 16), sum = get_u64(data, 24);
  if (data.size() - kHeaderBytes != size)
    return error("truncated (%zu of %llu bytes)", data.size() - kHeaderBytes,
                 static_cast<unsigned long long>(size));
  Fnv64 f;
  f.add(data.data() + kHeaderBytes, size);
  if (f.h != sum) return error("its checksum does not match");
  return data.substr(kHeaderBytes);
}

// Writes atomically (a temporary file renamed over the entry): a concurrent reader sees the old
// file or the new one, never half of one.
Status write_entry(const std::string& path, uint64_t key, const std::string& binary) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  if (ec) return error("cannot create %s: %s", path.c_str(), ec.message().c_str());
  std::string data(kMagic, 8);
  put_u64(data, key);
  put_u64(data, binary.size());
  Fnv64 f;
  f.add(binary.data(), binary.size());
  put_u64(data, f.h);
  data += binary;
  const std::string tmp = path + ".tmp" + std::to_string(static_cast<long long>(getpid()));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return error("cannot write %s", tmp.c_str());
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!out) return error("cannot write %s", tmp.c_str());
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    return error("cannot write %s", path.c_str());
  }
  return Status::ok();
}

Expected<std::string> program_binary(cl_program program) {
  size_t size = 0;
  KESTREL_CL_TRY(clGetProgramInfo(program, CL_PROGRAM_BINARY_SIZES, sizeof size, &size, nullptr),
                 "OpenCL program cache");
  if (size == 0) return error("the driver gives no program binary");
  std::string binary(size, '\0');
  unsigned char* ptr = reinterpret_cast<unsigned char*>(binary.data());
  KESTREL_CL_TRY(clGetProgramInfo(program, CL_PROGRAM_BINARIES, sizeof ptr, &ptr, nullptr),
                 "OpenCL program cache");
  return binary;
}

// The program from a cached binary, or why not.
Expected<cl_program> load_binary(cl_context context, cl_device_id device, const std::string& bin,
                                 const std::string& options) {
  const size_t size = bin.size();
  const auto* ptr = reinterpret_cast<const unsigned char*>(bin.data());
  cl_int status = CL_SUCCESS, err = CL_SUCCESS;
  cl_program p = clCreateProgramWithBinary(context, 1, &device, &size, &ptr, &status, &err);
  if (err != CL_SUCCESS || status != CL_SUCCESS) {
    if (p) clReleaseProgram(p);
    return error("the driver refuses the binary (%s)",
                 cl_error_name(err != CL_SUCCESS ? err : status).c_str());
  }
  err = clBuildProgram(p, 1, &device, options.c_str(), nullptr, nullptr);
  if (err != CL_SUCCESS) {
    clReleaseProgram(p);
    return error("building from the binary failed (%s)", cl_error_name(err).c_str());
  }
  return p;
}

}  // namespace

std::string default_cache_dir() {
  if (const char* off = std::getenv("KESTREL_CL_CACHE"); off && std::string(off) == "0") return "";
  if (const char* dir = std::getenv("KESTREL_CL_CACHE_DIR"); dir && *dir) return dir;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg)
    return std::string(xdg) + "/kestrel/opencl";
  if (const char* home = std::getenv("HOME"); home && *home)
    return std::string(home) + "/.cache/kestrel/opencl";
  return "";
}

std::string cache_path(const std::string& dir, cl_device_id device,
                       const std::vector<std::string>& sources, const std::string& options) {
  return dir + "/" +
         format("%016llx.bin", static_cast<unsigned long long>(key_of(device, sources, options)));
}

Expected<ProgramBuild> build_program(cl_context context, cl_device_id device,
                                     const std::vector<std::string>& sources,
                                     const std::string& options, const std::string& cache_dir) {
  const auto t0 = std::chrono::steady_clock::now();
  ProgramBuild out;
  const uint64_t key = key_of(device, sources, options);
  const std::string path = cache_dir.empty() ? "" : cache_path(cache_dir, device, sources, options);
  if (!path.empty()) {
    auto entry = read_entry(path, key);
    if (entry) {
      auto p = load_binary(context, device, *entry, options);
      if (p) {
        out.program = *p;
        out.from_cache = true;
        out.ms = ms_since(t0);
        out.note = "kernels loaded from the program cache " + path;
        return out;
      }
      out.note = "the program cache file " + path + " is unusable (" + p.message() +
                 "): rebuilt from source";
    } else if (entry.message() != "missing") {
      out.note = "the program cache file " + path + " is corrupt (" + entry.message() +
                 "): rebuilt from source";
    }
  }
  std::vector<const char*> texts;
  std::vector<size_t> lengths;
  for (const std::string& s : sources) {
    texts.push_back(s.data());
    lengths.push_back(s.size());
  }
  cl_int err = CL_SUCCESS;
  cl_program p = clCreateProgramWithSource(context, static_cast<cl_uint>(texts.size()),
                                           texts.data(), lengths.data(), &err);
  KESTREL_CL_TRY(err, "OpenCL kernels");
  err = clBuildProgram(p, 1, &device, options.c_str(), nullptr, nullptr);
  if (err != CL_SUCCESS) {
    const std::string log = build_log(p, device);
    clReleaseProgram(p);
    return error("the OpenCL kernels failed to build on %s (%s) with options '%s'; build log:\n%s",
                 device_string(device, CL_DEVICE_NAME).c_str(), cl_error_name(err).c_str(),
                 options.c_str(), log.c_str());
  }
  out.program = p;
  if (!path.empty()) {
    auto binary = program_binary(p);
    Status st = binary ? write_entry(path, key, *binary) : binary.status();
    const std::string what =
        st ? "compiled; cached in " + path : "compiled; not cached (" + st.message() + ")";
    out.note = out.note.empty() ? "kernels " + what : out.note + "; " + what;
  } else {
    out.note = "kernels compiled (program cache off)";
  }
  out.ms = ms_since(t0);
  return out;
}

}  // namespace kestrel::backend::opencl
