// Per-environment state of the addon (worker threads each load their own): the constructors of the
// handle classes, so that handles can be made and recognised from C++.
#pragma once
#include <napi.h>

namespace kvflash::binding {

struct AddonData {
  Napi::FunctionReference tensor_constructor;
  Napi::FunctionReference page_table_constructor;
};

inline AddonData& addon_data(Napi::Env env) {
  AddonData* data = env.GetInstanceData<AddonData>();
  if (!data) {
    data = new AddonData();
    env.SetInstanceData<AddonData>(data);
  }
  return *data;
}

}  // namespace kvflash::binding
