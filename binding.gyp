{
  "targets": [
    {
      "target_name": "kvflash",
      "sources": [
        "native/core/allocator.cpp",
        "native/core/backend.cpp",
        "native/core/quest_steps.cpp",
        "native/core/tensor.cpp",
        "native/cpu/attention.cpp",
        "native/cpu/cpu_backend.cpp",
        "native/cpu/quant.cpp",
        "native/cpu/quest.cpp",
        "native/binding/addon.cpp",
        "native/binding/attention_functions.cpp",
        "native/binding/graph_functions.cpp",
        "native/binding/args.cpp",
        "native/binding/page_table.cpp",
        "native/binding/pending_promise.cpp",
        "native/binding/quant_functions.cpp",
        "native/binding/quest_functions.cpp",
        "native/binding/runtime_functions.cpp",
        "native/binding/tensor_args.cpp",
        "native/binding/tensor_functions.cpp",
        "native/binding/tensor_handle.cpp",
        "native/cpu/no_cuda.cpp"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-O3"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++14", "-std=gnu++17"],
      "xcode_settings": {
        "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
        "CLANG_CXX_LANGUAGE_STANDARD": "c++17"
      },
      "msvs_settings": {
        "VCCLCompilerTool": { "ExceptionHandling": 1, "AdditionalOptions": ["/std:c++17"] }
      }
    }
  ]
}
