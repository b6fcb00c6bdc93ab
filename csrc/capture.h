// LayerCapture: copies the rows of one named ggml graph tensor (e.g. llama.cpp's residual-stream
// output "l_out-12") out of every llama_decode, through llama.cpp's eval callback
// (llama_context_params.cb_eval / cb_eval_user_data, ggml_backend_sched_eval_callback).
//
// Nothing here is compiled against llama.cpp or ggml: the five ggml functions used are looked up
// at run time (dlopen / dlsym) in the libggml-base shared library llama.cpp already loaded, and
// tensors are opaque pointers.
//
// Lifetime: llama.cpp keeps the raw callback address and the raw object address. The LayerCapture
// must outlive every llama_context created with it (free the context first), or llama_decode will
// call into freed memory.
//
// Threads: the callback runs on the thread that calls llama_decode. Enabling, disabling and the
// counters are atomics; the row buffer is guarded by a mutex, so take()/clear() from another thread
// are safe (they see whole tensors only).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>

namespace pyguard {

class LayerCapture {
 public:
  // Opens lib_path (RTLD_NOLOAD first, so the copy llama.cpp uses is found; otherwise a normal,
  // never-unloaded dlopen: it then works on a second copy of ggml, which is legal for the
  // functions used but should be avoided, see loaded_fresh) and resolves the ggml functions.
  // Throws OSError (dlopen) or RuntimeError (missing symbol, naming it).
  LayerCapture(const std::string& lib_path, const std::string& name);
  ~LayerCapture();
  LayerCapture(const LayerCapture&) = delete;
  LayerCapture& operator=(const LayerCapture&) = delete;

  // The eval callback; user_data is the LayerCapture*. Never returns false when ask is false
  // (that would stop the graph computation).
  static bool eval(void* tensor, bool ask, void* user_data);

  using get_name_fn = const char* (*)(const void*);
  using nelements_fn = int64_t (*)(const void*);
  using nrows_fn = int64_t (*)(const void*);
  using nbytes_fn = size_t (*)(const void*);
  using tensor_get_fn = void (*)(const void*, void*, size_t, size_t);

  const std::string lib_path;
  const std::string name;
  // True if RTLD_NOLOAD failed and the library was loaded by us: lib_path is not the file
  // llama.cpp loaded (llama-cpp-python's wheel holds copies, not symlinks, of libggml-base.so,
  // .so.0 and .so.0.x.y; libllama loads .so.0).
  bool loaded_fresh = false;
  std::atomic<bool> enabled{true};
  std::atomic<uint64_t> asks{0};      // ask calls while enabled
  std::atomic<uint64_t> captures{0};  // tensors copied

  // Under mu:
  std::mutex mu;
  std::vector<float> data;
  int64_t n_rows = 0;
  int64_t n_embd = 0;  // 0 until the first tensor is seen
  std::string error;   // first error since the last take()/clear()

 private:
  void on_data(const void* tensor);
  void* handle_ = nullptr;
  get_name_fn get_name_ = nullptr;
  nelements_fn nelements_ = nullptr;
  nrows_fn nrows_ = nullptr;
  nbytes_fn nbytes_ = nullptr;
  tensor_get_fn tensor_get_ = nullptr;
};

// Adds the LayerCapture class to the module (called from PYBIND11_MODULE in bindings.cpp).
void register_capture(pybind11::module_& m);

}  // namespace pyguard
