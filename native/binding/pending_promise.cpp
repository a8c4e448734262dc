#include "pending_promise.h"

#include "../core/errors.h"
#include "args.h"

namespace kvflash::binding {
namespace {

class WaitWorker : public Napi::AsyncWorker {
 public:
  WaitWorker(Napi::Env env, std::function<void()> wait, std::function<Napi::Value(Napi::Env)> finish)
      : Napi::AsyncWorker(env, "kvflash.wait"),
        deferred_(Napi::Promise::Deferred::New(env)),
        wait_(std::move(wait)),
        finish_(std::move(finish)) {}

  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      wait_();
    } catch (const Error& e) {
      code_ = error_code_name(e.code());
      SetError(e.what());
    }
  }

  void OnOK() override {
    try {
      deferred_.Resolve(finish_(Env()));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (const Error& e) {
      reject(error_code_name(e.code()), e.what());
    }
  }

  void OnError(const Napi::Error& e) override { reject(code_.c_str(), e.Message()); }

 private:
  void reject(const char* code, const std::string& message) {
    Napi::Error err = Napi::Error::New(Env(), message);
    err.Set("code", Napi::String::New(Env(), code));
    deferred_.Reject(err.Value());
  }

  Napi::Promise::Deferred deferred_;
  std::function<void()> wait_;
  std::function<Napi::Value(Napi::Env)> finish_;
  std::string code_ = "E_CUDA";
};

}  // namespace

Napi::Promise settle_after(Napi::Env env, std::function<void()> wait, std::function<Napi::Value(Napi::Env)> finish) {
  auto* worker = new WaitWorker(env, std::move(wait), std::move(finish));
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

}  // namespace kvflash::binding
