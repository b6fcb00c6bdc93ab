// LayerCapture (see capture.h): llama.cpp eval callback that copies one named tensor's rows.
#include "capture.h"

#include "kernels.h"

#include <dlfcn.h>
#include <pybind11/numpy.h>

#include <cmath>
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
    tensor_set_ = lookup<tensor_set_fn>(handle_, "ggml_backend_tensor_set", lib_path);
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

namespace {

// il of a tensor named "l_out-<il>", else -1.
int l_out_index(const char* n) {
  if (!n || std::strncmp(n, "l_out-", 6) != 0) return -1;
  char* end = nullptr;
  const long il = std::strtol(n + 6, &end, 10);
  return (end != n + 6 && *end == '\0' && il >= 0 && il < INT_MAX) ? static_cast<int>(il) : -1;
}

}  // namespace

bool LayerCapture::eval(void* tensor, bool ask, void* user_data) {
  auto* self = static_cast<LayerCapture*>(user_data);
  const bool cap = self->enabled.load(std::memory_order_relaxed);
  if (!cap && !self->planned_) return !ask;  // ask: no; data: continue
  const char* n = self->get_name_(tensor);
  const bool named = cap && n && std::strcmp(n, self->name.c_str()) == 0;
  const int il = self->planned_ ? l_out_index(n) : -1;
  if (ask) {
    if (cap) self->asks.store(self->asks.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    if (il >= 0) {  // every ubatch's graph runs l_out-0, l_out-1, ... in order
      if (il <= self->last_il_) ++self->ub_;
      self->last_il_ = il;
    }
    return named || (il >= 0 && self->shift_wanted(il));
  }
  if (il >= 0 && self->shift_wanted(il)) self->on_shift(tensor, il);  // before anyone reads it
  if (named) self->on_data(tensor);
  return true;  // false would stop the computation of the graph
}

bool LayerCapture::shift_wanted(int il) {
  if (il < shift_first_ || il > shift_last_ || il >= shift_layers_ || !shift_error_.empty()) return false;
  if (plan_all_) return true;
  if (ub_ < 0 || ub_ >= static_cast<int64_t>(plan_.size())) {
    std::ostringstream os;
    os << "llama.cpp ran ubatch " << ub_ << ", the shift was planned for " << plan_.size();
    shift_error_ = os.str();
    return false;
  }
  const Ubatch& u = plan_[static_cast<size_t>(ub_)];
  return il == shift_layers_ - 1 ? u.any_out : u.any_rows;
}

void LayerCapture::on_shift(void* t, int il) {
  const int64_t ne = nelements_(t), nr = nrows_(t);
  const size_t nb = nbytes_(t);
  if (ne == 0 && plan_all_) return;  // the last layer of a decode without outputs
  if (ne <= 0 || nr <= 0 || ne != nr * shift_d_ || nb != static_cast<size_t>(ne) * sizeof(float)) {
    std::ostringstream os;
    os << "cannot shift l_out-" << il << ": " << ne << " elements in " << nr << " rows, " << nb
       << " bytes; the shift table has rows of " << shift_d_ << " float32 values";
    shift_error_ = os.str();
    return;
  }
  const uint8_t* mask = nullptr;
  if (!plan_all_) {
    const Ubatch& u = plan_[static_cast<size_t>(ub_)];
    const std::vector<uint8_t>& m = il == shift_layers_ - 1 ? u.out : u.rows;
    if (static_cast<int64_t>(m.size()) != nr) {
      std::ostringstream os;
      os << "l_out-" << il << " of ubatch " << ub_ << " has " << nr << " rows, the shift was planned for "
         << m.size();
      shift_error_ = os.str();
      return;
    }
    mask = m.data();
  }
  buf_.resize(static_cast<size_t>(ne));
  tensor_get_(t, buf_.data(), 0, nb);
  cmrm_shift(buf_.data(), nr, shift_d_, shift_v_.data() + static_cast<size_t>(il) * shift_d_, shift_alpha_, mask);
  tensor_set_(t, buf_.data(), 0, nb);
  shifts.store(shifts.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

void LayerCapture::set_shift(std::vector<float> vectors, int64_t n_layer, int64_t n_embd, float alpha, int first,
                             int last) {
  shift_v_ = std::move(vectors);
  shift_layers_ = n_layer;
  shift_d_ = n_embd;
  shift_alpha_ = alpha;
  shift_first_ = first;
  shift_last_ = last;
}

void LayerCapture::clear_shift() {
  shift_v_.clear();
  shift_layers_ = shift_d_ = 0;
  shift_last_ = -1;
}

void LayerCapture::plan_shift(std::vector<std::vector<uint8_t>> rows, const std::vector<std::vector<uint8_t>>& outs,
                              bool all) {
  plan_.clear();
  for (size_t u = 0; u < rows.size(); ++u) {
    Ubatch b;
    b.rows = std::move(rows[u]);
    for (size_t i = 0; i < b.rows.size(); ++i) {
      b.rows[i] = b.rows[i] != 0;
      b.any_rows = b.any_rows || b.rows[i];
      if (outs[u][i]) {
        b.out.push_back(b.rows[i]);
        b.any_out = b.any_out || b.rows[i];
      }
    }
    plan_.push_back(std::move(b));
  }
  plan_all_ = all;
  planned_ = shift_layers_ > 0;
  ub_ = -1;
  last_il_ = INT_MAX;
  shift_error_.clear();
}

std::string LayerCapture::end_shift() {
  std::string err = shift_error_;
  if (err.empty() && planned_ && !plan_all_ && ub_ + 1 != static_cast<int64_t>(plan_.size())) {
    std::ostringstream os;
    os << "llama.cpp ran " << ub_ + 1 << " ubatches, the shift was planned for " << plan_.size();
    err = os.str();
  }
  planned_ = plan_all_ = false;
  plan_.clear();
  shift_error_.clear();
  return err;
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

std::vector<uint8_t> mask_of(const py::handle& h, const char* what, py::ssize_t u) {
  py::array m = py::array::ensure(h);
  if (!m || m.ndim() != 1 || (!m.dtype().equal(py::dtype::of<bool>()) && !m.dtype().equal(py::dtype::of<uint8_t>())))
    throw std::invalid_argument("plan_shift: ubatch " + std::to_string(u) + "'s " + what +
                                " must be a 1-D bool or uint8 array");
  py::array_t<uint8_t, py::array::c_style | py::array::forcecast> c(m);
  return std::vector<uint8_t>(c.data(), c.data() + c.size());
}

void set_shift(LayerCapture& c, const py::object& v_o, double alpha, int first, int last) {
  if (v_o.is_none()) return c.clear_shift();
  py::array v = py::array::ensure(v_o);
  if (!v || v.ndim() != 2 || !v.dtype().equal(py::dtype::of<float>()) || v.shape(0) < 1 || v.shape(1) < 1)
    throw std::invalid_argument("set_shift: vectors must be a float32 [n_layer, n_embd] array");
  if (!std::isfinite(alpha)) throw std::invalid_argument("set_shift: alpha is not finite");
  if (first < 0 || first > last || last >= v.shape(0))
    throw std::invalid_argument("set_shift: layers [" + std::to_string(first) + ", " + std::to_string(last) +
                                "] are outside [0, " + std::to_string(v.shape(0)) + ")");
  py::array_t<float, py::array::c_style | py::array::forcecast> cv(v);
  std::vector<float> data(cv.data(), cv.data() + cv.size());
  for (float x : data)
    if (!std::isfinite(x)) throw std::invalid_argument("set_shift: vectors hold NaN or infinite values");
  c.set_shift(std::move(data), v.shape(0), v.shape(1), static_cast<float>(alpha), first, last);
}

void plan_shift(LayerCapture& c, const py::object& plan) {
  if (!c.shift_rows_ready()) throw std::invalid_argument("plan_shift: no shift table (set_shift)");
  if (py::isinstance<py::bool_>(plan)) {
    if (!plan.cast<bool>()) throw std::invalid_argument("plan_shift: False plans nothing; skip the call");
    return c.plan_shift({}, {}, true);
  }
  std::vector<std::vector<uint8_t>> rows, outs;
  py::ssize_t u = 0;
  for (const py::handle& item : plan) {
    py::tuple t = py::reinterpret_borrow<py::object>(item).cast<py::tuple>();
    if (t.size() != 2) throw std::invalid_argument("plan_shift: each ubatch is a (rows, outputs) pair");
    rows.push_back(mask_of(t[0], "rows", u));
    outs.push_back(mask_of(t[1], "outputs", u));
    if (rows.back().size() != outs.back().size())
      throw std::invalid_argument("plan_shift: ubatch " + std::to_string(u) + "'s rows and outputs differ in length");
    ++u;
  }
  c.plan_shift(std::move(rows), outs, false);
}

void end_shift(LayerCapture& c) {
  const std::string err = c.end_shift();
  if (!err.empty()) throw std::runtime_error("LayerCapture: " + err);
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
With a shift table (``set_shift``) and a plan (``plan_shift``), it also subtracts CMRM's vectors
from chosen rows of each layer's output ``l_out-il`` (``cmrm_shift``) before the next layer reads
them: a llama.cpp control vector on some rows of a batch.
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
      .def("set_shift", &set_shift, py::arg("vectors"), py::arg("alpha"), py::arg("first"), py::arg("last"),
           "CMRM's table for the row shift: rows of l_out-il planned by plan_shift() lose alpha * "
           "vectors[il] (float32 [n_layer, n_embd]) for il in [first, last]; None clears it.")
      .def("plan_shift", &plan_shift, py::arg("ubatches"),
           "The next decode's shift: True (every row of every ubatch) or a list with, per ubatch in "
           "llama.cpp's order, (rows, outputs): uint8/bool [n_rows] masks of the rows to shift and of "
           "the rows with outputs. Call end_shift() after the decode.")
      .def("end_shift", &end_shift,
           "Ends the plan; RuntimeError if llama.cpp's ubatches or tensors differed from it (nothing "
           "was shifted wrongly: a mismatched tensor is left as it is).")
      .def_property_readonly("shifts", [](LayerCapture& c) { return c.shifts.load(); },
                             "Number of tensors shifted.")
      .def("__repr__", [](LayerCapture& c) {
        std::lock_guard<std::mutex> lock(c.mu);
        std::ostringstream os;
        os << "LayerCapture(name='" << c.name << "', enabled=" << (c.enabled.load() ? "True" : "False")
           << ", rows=" << c.n_rows << ", n_embd=" << c.n_embd << ")";
        return os.str();
      });
}

}  // namespace pyguard
