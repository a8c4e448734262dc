// Typed errors shared by every layer of the native core. The binding turns an Error into a JS
// exception carrying `code`, and lib/errors.ts turns that into a KvflashError at the JS call site.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace kvflash {

enum class ErrorCode { Dtype, Shape, Device, Range, Disposed, OutOfMemory, Cuda, Unsupported };

inline const char* error_code_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::Dtype: return "E_DTYPE";
    case ErrorCode::Shape: return "E_SHAPE";
    case ErrorCode::Device: return "E_DEVICE";
    case ErrorCode::Range: return "E_RANGE";
    case ErrorCode::Disposed: return "E_DISPOSED";
    case ErrorCode::OutOfMemory: return "E_OOM";
    case ErrorCode::Cuda: return "E_CUDA";
    case ErrorCode::Unsupported: return "E_UNSUPPORTED";
  }
  return "E_UNKNOWN";
}

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

// Builds the message from any streamable pieces: fail(ErrorCode::Shape, "Expected ", n, " but received ", m).
template <typename... Parts>
[[noreturn]] void fail(ErrorCode code, const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  throw Error(code, out.str());
}

}  // namespace kvflash

// Checks a condition that depends on caller input; the message parts are only built on failure.
#define KV_CHECK(cond, code, ...)                          \
  do {                                                     \
    if (!(cond)) ::kvflash::fail(::kvflash::ErrorCode::code, __VA_ARGS__); \
  } while (0)
