// Waiting for device work without blocking the event loop: the wait runs on a libuv worker thread,
// then a promise settles on the main thread. Errors keep their kvflash code.
#pragma once
#include <napi.h>

#include <functional>
#include <string>

namespace kvflash::binding {

// Runs `wait` on a worker thread; on success resolves with `finish(env)` run on the main thread.
Napi::Promise settle_after(Napi::Env env, std::function<void()> wait, std::function<Napi::Value(Napi::Env)> finish);

}  // namespace kvflash::binding
