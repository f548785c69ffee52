// Status and Expected<T>: how library code reports failure. No exceptions cross module
// boundaries and nothing aborts; every message names the problem and, where it can, the fix.
#pragma once

#include <cassert>
#include <cstdio>
#include <string>
#include <utility>
#include <variant>

namespace kestrel {

class Status {
 public:
  Status() = default;
  static Status ok() { return Status(); }
  static Status error(std::string message) {
    Status s;
    s.failed_ = true;
    s.message_ = std::move(message);
    return s;
  }
  bool is_ok() const { return !failed_; }
  explicit operator bool() const { return !failed_; }
  const std::string& message() const { return message_; }

 private:
  bool failed_ = false;
  std::string message_;
};

// printf-style message formatting for error paths.
template <typename... Args>
std::string format(const char* fmt, Args... args) {
  int n = std::snprintf(nullptr, 0, fmt, args...);
  std::string out(n > 0 ? n : 0, '\0');
  if (n > 0) std::snprintf(out.data(), out.size() + 1, fmt, args...);
  return out;
}

template <typename... Args>
Status error(const char* fmt, Args... args) {
  return Status::error(format(fmt, args...));
}
// A message without arguments is taken as is (no format string to interpret).
inline Status error(const char* message) {
  return Status::error(message);
}

template <typename T>
class Expected {
 public:
  Expected(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Expected(Status status) : v_(std::move(status)) {  // NOLINT: implicit by design
    assert(!std::get<Status>(v_).is_ok() && "Expected built from an ok Status");
  }
  bool has_value() const { return v_.index() == 0; }
  explicit operator bool() const { return has_value(); }
  T& value() & { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  const T& value() const& { return std::get<0>(v_); }
  T& operator*() & { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  const Status& status() const {
    static const Status ok_status;
    return has_value() ? ok_status : std::get<1>(v_);
  }
  const std::string& message() const { return status().message(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace kestrel

// Propagate a failed Status from an expression returning Status.
#define KESTREL_TRY(expr)                       \
  do {                                          \
    ::kestrel::Status kestrel_try_s_ = (expr);  \
    if (!kestrel_try_s_) return kestrel_try_s_; \
  } while (0)

#define KESTREL_CONCAT_INNER(a, b) a##b
#define KESTREL_CONCAT(a, b) KESTREL_CONCAT_INNER(a, b)
// Assign the value of an Expected<T> expression to `lhs` or return its Status.
#define KESTREL_ASSIGN_OR_RETURN(lhs, expr) \
  KESTREL_ASSIGN_OR_RETURN_IMPL(KESTREL_CONCAT(kestrel_exp_, __LINE__), lhs, expr)
#define KESTREL_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp) return tmp.status();                      \
  lhs = std::move(tmp).value()
