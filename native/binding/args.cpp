#include "args.h"

#include <algorithm>
#include <cmath>

namespace kvflash::binding {

std::string describe_value(const Napi::Value& v) {
  switch (v.Type()) {
    case napi_undefined: return "undefined";
    case napi_null: return "null";
    case napi_boolean: return std::string(v.As<Napi::Boolean>().Value() ? "true" : "false") + " of type boolean";
    case napi_number: {
      const Napi::Value text = v.ToString();
      return text.As<Napi::String>().Utf8Value() + " of type number";
    }
    case napi_string: return "'" + v.As<Napi::String>().Utf8Value() + "' of type string";
    case napi_bigint: return "a bigint";
    case napi_function: return "a function";
    case napi_object: return v.IsArray() ? "an array" : "an object";
    default: return "a value of another type";
  }
}

void throw_js(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  throw err;
}

int64_t get_int(const Napi::Value& v, const char* name, int64_t min_value, int64_t max_value) {
  const bool is_int = v.IsNumber() && std::isfinite(v.As<Napi::Number>().DoubleValue()) &&
                      std::floor(v.As<Napi::Number>().DoubleValue()) == v.As<Napi::Number>().DoubleValue();
  KV_CHECK(is_int, Range, "Expected integer for ", name, " but received ", describe_value(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  KV_CHECK(d >= static_cast<double>(min_value) && d <= static_cast<double>(max_value), Range, "Expected integer in [",
           min_value, ", ", max_value, "] for ", name, " but received ", describe_value(v));
  return static_cast<int64_t>(d);
}

double get_number(const Napi::Value& v, const char* name) {
  KV_CHECK(v.IsNumber(), Range, "Expected number for ", name, " but received ", describe_value(v));
  return v.As<Napi::Number>().DoubleValue();
}

bool get_bool(const Napi::Value& v, const char* name) {
  KV_CHECK(v.IsBoolean(), Range, "Expected boolean for ", name, " but received ", describe_value(v));
  return v.As<Napi::Boolean>().Value();
}

std::string get_string(const Napi::Value& v, const char* name) {
  KV_CHECK(v.IsString(), Range, "Expected string for ", name, " but received ", describe_value(v));
  return v.As<Napi::String>().Utf8Value();
}

DType get_dtype(const Napi::Value& v, const char* name) {
  DType t;
  KV_CHECK(v.IsString() && parse_dtype(v.As<Napi::String>().Utf8Value(), &t), Dtype,
           "Expected one of f32, f16, bf16, fp8e4m3, i8, u8, i32, i64 for ", name, " but received ",
           describe_value(v));
  return t;
}

Device get_device(const Napi::Value& v, const char* name) {
  KV_CHECK(v.IsString(), Device, "Expected 'cpu', 'cuda' or 'cuda:N' for ", name, " but received ", describe_value(v));
  return Device::parse(v.As<Napi::String>().Utf8Value(), name);
}

Shape get_shape(const Napi::Value& v, const char* name) {
  KV_CHECK(v.IsArray(), Shape, "Expected array of non-negative integers for ", name, " but received ",
           describe_value(v));
  const Napi::Array arr = v.As<Napi::Array>();
  Shape shape;
  double elements = 1;
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    const std::string what = std::string(name) + "[" + std::to_string(i) + "]";
    const Napi::Value d = arr.Get(i);
    const bool ok = d.IsNumber() && std::isfinite(d.As<Napi::Number>().DoubleValue()) &&
                    d.As<Napi::Number>().DoubleValue() >= 0 &&
                    std::floor(d.As<Napi::Number>().DoubleValue()) == d.As<Napi::Number>().DoubleValue();
    KV_CHECK(ok, Shape, "Expected non-negative integer for ", what, " but received ", describe_value(d));
    shape.push_back(static_cast<int64_t>(d.As<Napi::Number>().DoubleValue()));
    elements *= d.As<Napi::Number>().DoubleValue();
  }
  KV_CHECK(elements < 9.0e15, Shape, "Expected fewer than 2^53 elements for ", name, " but received ",
           shape_str(shape));
  return shape;
}

HostInts get_ints(const Napi::Value& v, const char* name) {
  const bool ok = v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_int32_array;
  KV_CHECK(ok, Dtype, "Expected Int32Array for ", name, " but received ", describe_value(v));
  const Napi::Int32Array a = v.As<Napi::Int32Array>();
  return {a.Data(), static_cast<int64_t>(a.ElementLength())};
}

int check_offsets(const HostInts& a, int64_t total, const char* name, const char* rows_of, int* max_len) {
  KV_CHECK(a.size >= 2, Shape, "Expected at least 2 entries (B+1) for ", name, " but received ", a.size);
  KV_CHECK(a[0] == 0, Range, "Expected ", name, "[0] = 0 but received ", a[0]);
  *max_len = 0;
  for (int64_t i = 1; i < a.size; ++i) {
    KV_CHECK(a[i] >= a[i - 1], Range, "Expected ", name, " to never decrease but received ", name, "[", i, "] = ", a[i],
             " after ", a[i - 1]);
    *max_len = std::max(*max_len, a[i] - a[i - 1]);
  }
  KV_CHECK(a[a.size - 1] == total, Range, "Expected ", name, " to end at ", total, " (the rows of ", rows_of,
           ") but received ", a[a.size - 1]);
  return static_cast<int>(a.size - 1);
}

}  // namespace kvflash::binding
