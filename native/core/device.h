// Where a tensor lives: the host ("cpu") or one CUDA device ("cuda:N").
#pragma once
#include <string>

#include "errors.h"

namespace kvflash {

enum class DeviceType { Cpu, Cuda };

struct Device {
  DeviceType type = DeviceType::Cpu;
  int index = 0;

  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  bool is_cuda() const { return type == DeviceType::Cuda; }

  std::string name() const { return type == DeviceType::Cpu ? "cpu" : "cuda:" + std::to_string(index); }

  // Accepts "cpu", "cuda" (device 0) and "cuda:N".
  static Device parse(const std::string& s, const char* arg_name) {
    if (s == "cpu") return {DeviceType::Cpu, 0};
    if (s == "cuda") return {DeviceType::Cuda, 0};
    if (s.rfind("cuda:", 0) == 0 && s.size() > 5 && s.size() <= 8) {
      int index = 0;
      for (size_t i = 5; i < s.size(); ++i) {
        if (s[i] < '0' || s[i] > '9') index = -1;
        if (index >= 0) index = index * 10 + (s[i] - '0');
      }
      if (index >= 0) return {DeviceType::Cuda, index};
    }
    fail(ErrorCode::Device, "Expected 'cpu', 'cuda' or 'cuda:N' for ", arg_name, " but received '", s, "'");
  }
};

}  // namespace kvflash
