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
// Row shift (CMRM per request inside a mixed batch): with a table set (set_shift) and a plan for
// the next decode (plan_shift: per ubatch, which rows to shift), the callback subtracts
// alpha * vectors[il] from the planned rows of l_out-il for il in [first, last], with cmrm_shift,
// before anything reads them: the same arithmetic as a llama.cpp control vector of -alpha *
// vectors, on chosen rows only. The last layer's l_out holds only the rows with outputs.
//
// Threads: the callback runs on the thread that calls llama_decode. Enabling, disabling and the
// counters are atomics; the row buffer is guarded by a mutex, so take()/clear() from another thread
// are safe (they see whole tensors only). The shift table and plan belong to the decoding thread.
#pragma once

#include <atomic>
#include <climits>
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
  using tensor_set_fn = void (*)(void*, const void*, size_t, size_t);

  // The shift table: vectors [n_layer * n_embd] row-major, applied to layers first..last.
  void set_shift(std::vector<float> vectors, int64_t n_layer, int64_t n_embd, float alpha, int first, int last);
  void clear_shift();
  // The next decode's ubatches: rows[u] marks the rows of ubatch u to shift, outs[u] those with
  // outputs (the rows of the last layer); all = true: every row of every ubatch.
  void plan_shift(std::vector<std::vector<uint8_t>> rows, const std::vector<std::vector<uint8_t>>& outs, bool all);
  // Ends the plan; the first error since plan_shift ("" if none).
  std::string end_shift();
  bool shift_rows_ready() const { return shift_layers_ > 0; }
  std::atomic<uint64_t> shifts{0};  // tensors shifted

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
  bool shift_wanted(int il);
  void on_shift(void* tensor, int il);

  struct Ubatch {
    std::vector<uint8_t> rows, out;  // shift masks: every row, the rows with outputs
    bool any_rows = false, any_out = false;
  };
  std::vector<float> shift_v_;
  int64_t shift_layers_ = 0, shift_d_ = 0;
  float shift_alpha_ = 0.f;
  int shift_first_ = 0, shift_last_ = -1;
  std::vector<Ubatch> plan_;
  bool planned_ = false, plan_all_ = false;
  int64_t ub_ = -1;         // the ubatch being computed (a new one starts at a lower l_out index)
  int last_il_ = INT_MAX;
  std::vector<float> buf_;
  std::string shift_error_;
  tensor_set_fn tensor_set_ = nullptr;
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
