// LayerCapture (see capture.h): llama.cpp eval callback that copies one named tensor's rows.
#include "capture.h"

#include <dlfcn.h>
#include <pybind11/numpy.h>

#include <cstring>
#include <sstream>
#include <stdexcept>

namespace py = pybind11;

namespace pyguard {

namespace {

[[noreturn]] void raise_os_error(const std::string& msg) {
  PyErr_SetString(PyExc_OSError, msg.c_str());
  throw py::error_already_set();
}

template <typename F>
F lookup(void* handle, const char* sym, const std::string& lib_path) {
  dlerror();
  void* p = dlsym(handle, sym);
  if (!p) {
    const char* err = dlerror();
    throw std::runtime_error("LayerCapture: symbol '" + std::string(sym) + "' not found in " + lib_path +
                             " (is this llama.cpp's libggml-base?)" + (err ? std::string(": ") + err : ""));
  }
  return reinterpret_cast<F>(p);
}

}  // namespace

LayerCapture::LayerCapture(const std::string& lib_path_, const std::string& name_)
    : lib_path(lib_path_), name(name_) {
  if (name.empty()) throw std::invalid_argument("LayerCapture: the tensor name is empty");
  if (lib_path.empty()) throw std::invalid_argument("LayerCapture: the library path is empty");
  handle_ = dlopen(lib_path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (!handle_) {
    dlerror();
    // A second copy of ggml (e.g. a duplicate file, not a symlink, of the loaded library). Never
    // unloaded: its constructor installs a std::terminate handler that must stay mapped, and a
    // reload would run that constructor again (GGML_ASSERT in ggml.cpp).
    handle_ = dlopen(lib_path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!handle_) {
      const char* err = dlerror();
      raise_os_error("LayerCapture: cannot load the ggml library '" + lib_path + "': " +
                     (err ? err : "unknown dlopen error"));
    }
    loaded_fresh = true;
  }
  try {
    get_name_ = lookup<get_name_fn>(handle_, "ggml_get_name", lib_path);
    nelements_ = lookup<nelements_fn>(handle_, "ggml_nelements", lib_path);
    nrows_ = lookup<nrows_fn>(handle_, "ggml_nrows", lib_path);
    nbytes_ = lookup<nbytes_fn>(handle_, "ggml_nbytes", lib_path);
    tensor_get_ = lookup<tensor_get_fn>(handle_, "ggml_backend_tensor_get", lib_path);
  } catch (...) {
    dlclose(handle_);
    handle_ = nullptr;
    throw;
  }
}

LayerCapture::~LayerCapture() {
  // Drops only our reference: a library llama.cpp loaded stays loaded, one we loaded is
  // RTLD_NODELETE.
  if (handle_) dlclose(handle_);
}

bool LayerCapture::eval(void* tensor, bool ask, void* user_data) {
  auto* self = static_cast<LayerCapture*>(user_data);
  if (!self->enabled.load(std::memory_order_relaxed)) return !ask;  // ask: no; data: continue
  if (ask) {
    self->asks.store(self->asks.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    const char* n = self->get_name_(tensor);
    return n && std::strcmp(n, self->name.c_str()) == 0;
  }
  const char* n = self->get_name_(tensor);
  if (n && std::strcmp(n, self->name.c_str()) == 0) self->on_data(tensor);
  return true;  // false would stop the computation of the graph
}

void LayerCapture::on_data(const void* t) {
  const int64_t ne = nelements_(t);
  const int64_t nr = nrows_(t);
  const size_t nb = nbytes_(t);
  std::lock_guard<std::mutex> lock(mu);
  if (!error.empty()) return;  // keep the first error; take()/clear() resets
  if (ne <= 0 || nr <= 0 || ne % nr != 0 || nb != static_cast<size_t>(ne) * sizeof(float)) {
    std::ostringstream os;
    os << "tensor '" << name << "' is not a contiguous float32 matrix: " << ne << " elements in " << nr
       << " rows, " << nb << " bytes";
    error = os.str();
    return;
  }
  const int64_t d = ne / nr;
  if (n_embd == 0) {
    n_embd = d;
  } else if (d != n_embd) {
    std::ostringstream os;
    os << "tensor '" << name << "' has rows of " << d << " values, earlier ones had " << n_embd;
    error = os.str();
    return;
  }
  const size_t old = data.size();
  data.resize(old + static_cast<size_t>(ne));
  tensor_get_(t, data.data() + old, 0, nb);
  n_rows += nr;
  captures.store(captures.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

namespace {

py::array_t<float> take(LayerCapture& c) {
  std::lock_guard<std::mutex> lock(c.mu);
  if (!c.error.empty()) {
    std::string msg = "LayerCapture: " + c.error;
    c.error.clear();
    c.data.clear();
    c.n_rows = 0;
    throw std::runtime_error(msg);
  }
  py::array_t<float> out({static_cast<py::ssize_t>(c.n_rows), static_cast<py::ssize_t>(c.n_embd)});
  if (!c.data.empty()) std::memcpy(out.mutable_data(), c.data.data(), c.data.size() * sizeof(float));
  c.data.clear();  // keeps the capacity for the next prefill
  c.n_rows = 0;
  return out;
}

void clear(LayerCapture& c) {
  std::lock_guard<std::mutex> lock(c.mu);
  c.error.clear();
  c.data.clear();
  c.n_rows = 0;
  c.n_embd = 0;
}

}  // namespace

void register_capture(py::module_& m) {
  using pyguard::LayerCapture;
  py::class_<LayerCapture>(m, "LayerCapture", R"doc(
Copies the rows of one named ggml tensor (e.g. llama.cpp's residual-stream output ``l_out-12``)
out of every ``llama_decode``, through llama.cpp's eval callback, entirely in C++.

``LayerCapture(lib_path, name)``: ``lib_path`` is the libggml-base shared library llama.cpp has
loaded (``pyguard.llama.capture.libggml_base_path()``), ``name`` the tensor name. Install it with
``pyguard.llama.capture.install(cparams, capture)`` (sets ``cparams.cb_eval`` to ``callback`` and
``cparams.cb_eval_user_data`` to ``user_data``) before ``llama_init_from_model``.

Rows accumulate in graph order over ubatches and decodes until ``take()`` (or ``clear()``).
The object must outlive every context created with it: free the context first.
)doc")
      .def(py::init<const std::string&, const std::string&>(), py::arg("lib_path"), py::arg("name"))
      .def_property_readonly_static(
          "callback",
          [](py::object) { return reinterpret_cast<uintptr_t>(&LayerCapture::eval); },
          "Address of the C callback bool(ggml_tensor*, bool ask, void* user_data), for cb_eval.")
      .def_property_readonly(
          "user_data", [](LayerCapture& c) { return reinterpret_cast<uintptr_t>(&c); },
          "Address of this object, for cb_eval_user_data.")
      .def_property(
          "enabled", [](LayerCapture& c) { return c.enabled.load(); },
          [](LayerCapture& c, bool on) { c.enabled.store(on); },
          "When False the callback declines every tensor (no copy, near-zero cost).")
      .def_property_readonly("name", [](LayerCapture& c) { return c.name; })
      .def_property_readonly("lib_path", [](LayerCapture& c) { return c.lib_path; })
      .def_property_readonly(
          "rows",
          [](LayerCapture& c) {
            std::lock_guard<std::mutex> lock(c.mu);
            return c.n_rows;
          },
          "Rows captured since the last take()/clear().")
      .def_property_readonly(
          "n_embd",
          [](LayerCapture& c) {
            std::lock_guard<std::mutex> lock(c.mu);
            return c.n_embd;
          },
          "Row length, fixed by the first captured tensor (0 before; reset by clear()).")
      .def_property_readonly("asks", [](LayerCapture& c) { return c.asks.load(); },
                             "Number of tensors the scheduler offered while enabled.")
      .def_property_readonly("captures", [](LayerCapture& c) { return c.captures.load(); },
                             "Number of tensors copied.")
      .def_property_readonly("loaded_fresh", [](LayerCapture& c) { return c.loaded_fresh; },
                             "True if the library was not already loaded and LayerCapture loaded it.")
      .def("take", &take,
           "The captured rows as a new float32 array [rows, n_embd]; empties the buffer. Raises "
           "RuntimeError (and empties the buffer) if a tensor was refused since the last take.")
      .def("clear", &clear, "Drops the captured rows, the error and the recorded n_embd.")
      .def("__repr__", [](LayerCapture& c) {
        std::lock_guard<std::mutex> lock(c.mu);
        std::ostringstream os;
        os << "LayerCapture(name='" << c.name << "', enabled=" << (c.enabled.load() ? "True" : "False")
           << ", rows=" << c.n_rows << ", n_embd=" << c.n_embd << ")";
        return os.str();
      });
}

}  // namespace pyguard
