// pybind11 bindings: pyguard._C. Every argument is validated here (shape, dtype, contiguity,
// ranges, finiteness of parameters) before any kernel runs; failures raise ValueError naming the
// argument and the numbers. Kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>

#include "capture.h"
#include "kernels.h"

namespace py = pybind11;
using pyguard::Isa;

namespace {

template <typename... Args>
[[noreturn]] void fail(const Args&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw py::value_error(os.str());
}

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

// Checks dtype T, C-contiguity, ndim, and (when >= 0) each dimension; returns the array.
template <typename T>
py::array check(const py::object& obj, const char* name, int ndim, py::ssize_t d0 = -1,
                py::ssize_t d1 = -1, bool writeable = false) {
  if (!py::isinstance<py::array>(obj)) fail(name, " must be a numpy array, got ", Py_TYPE(obj.ptr())->tp_name);
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<T>()))
    fail(name, " must have dtype ", std::string(py::str(py::dtype::of<T>())), ", got ", std::string(py::str(a.dtype())));
  if (a.ndim() != ndim) fail(name, " must be ", ndim, "-D, got shape ", shape_str(a));
  if (d0 >= 0 && a.shape(0) != d0) fail(name, " has shape ", shape_str(a), ", expected dim 0 = ", d0);
  if (d1 >= 0 && ndim > 1 && a.shape(1) != d1) fail(name, " has shape ", shape_str(a), ", expected dim 1 = ", d1);
  if (!(a.flags() & py::array::c_style)) fail(name, " must be C-contiguous");
  if (writeable && !a.writeable()) fail(name, " must be writeable");
  return a;
}

void check_finite(const float* p, py::ssize_t n, const char* name) {
  for (py::ssize_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) fail(name, "[", i, "] = ", p[i], " is not finite");
}

Isa parse_isa(const std::string& s) {
  if (s == "generic") return Isa::generic;
  if (s == "avx2") return Isa::avx2;
  fail("unknown instruction set '", s, "' (known: generic, avx2)");
}

py::tuple coca_step(const py::object& base_o, const py::object& safe_o, const py::object& alpha_o,
                    const py::object& temp_o, const py::object& force_o, const py::object& out_o) {
  py::array base = check<float>(base_o, "base", 2);
  const py::ssize_t B = base.shape(0), V = base.shape(1);
  if (V < 1) fail("base has shape ", shape_str(base), ": the vocabulary is empty");
  py::array safe = check<float>(safe_o, "safe", 2, B, V);
  py::array alpha = check<float>(alpha_o, "alpha", 1, B);
  py::array temp = check<float>(temp_o, "temperature", 1, B);
  const float* a = static_cast<const float*>(alpha.data());
  const float* t = static_cast<const float*>(temp.data());
  check_finite(a, B, "alpha");
  std::vector<float> inv_t(static_cast<size_t>(B));
  for (py::ssize_t i = 0; i < B; ++i) {
    if (!(t[i] > 0) || !std::isfinite(t[i])) fail("temperature[", i, "] = ", t[i], " must be finite and > 0");
    inv_t[i] = 1.0f / t[i];
  }
  const int64_t* force = nullptr;
  if (!force_o.is_none()) {
    py::array f = check<int64_t>(force_o, "force_token", 1, B);
    force = static_cast<const int64_t*>(f.data());
    for (py::ssize_t i = 0; i < B; ++i)
      if (force[i] < -1 || force[i] >= V) fail("force_token[", i, "] = ", force[i], " is outside [-1, ", V, ")");
  }
  float* out = nullptr;
  if (!out_o.is_none()) out = static_cast<float*>(check<float>(out_o, "out", 2, B, V, true).mutable_data());
  py::array_t<int64_t> token(B);
  py::array_t<float> kl(B);
  const float* bp = static_cast<const float*>(base.data());
  const float* sp = static_cast<const float*>(safe.data());
  int64_t* tp = token.mutable_data();
  float* kp = kl.mutable_data();
  std::fill(tp, tp + B, int64_t{-1});  // poisoned: a row the kernel skipped cannot pass a test
  std::fill(kp, kp + B, std::numeric_limits<float>::quiet_NaN());
  pyguard::active_isa();
  {
    py::gil_scoped_release nogil;
    pyguard::coca_step(bp, sp, B, V, a, inv_t.data(), force, out, tp, kp);
  }
  return py::make_tuple(token, kl);
}

void cmrm_shift_(const py::object& h_o, const py::object& v_o, double alpha, int64_t layer,
                 const py::object& mask_o) {
  py::array h = check<float>(h_o, "h", 2, -1, -1, true);
  const py::ssize_t N = h.shape(0), d = h.shape(1);
  if (!std::isfinite(alpha)) fail("alpha = ", alpha, " is not finite");
  if (!py::isinstance<py::array>(v_o)) fail("v must be a numpy array");
  const int vdim = py::reinterpret_borrow<py::array>(v_o).ndim();
  py::array v = check<float>(v_o, "v", vdim == 2 ? 2 : 1, vdim == 2 ? -1 : d, vdim == 2 ? d : -1);
  const float* vp = static_cast<const float*>(v.data());
  if (vdim == 2) {
    const py::ssize_t L = v.shape(0);
    if (layer < 0 || layer >= L) fail("layer = ", layer, " is outside the vector table's [0, ", L, ")");
    vp += layer * d;
  } else if (layer != -1) {
    fail("layer = ", layer, " given, but v is a single vector of shape ", shape_str(v));
  }
  check_finite(vp, d, "v");
  const uint8_t* mask = nullptr;
  if (!mask_o.is_none()) {
    if (!py::isinstance<py::array>(mask_o)) fail("row_mask must be a numpy array");
    py::array m = py::reinterpret_borrow<py::array>(mask_o);
    if (!m.dtype().equal(py::dtype::of<bool>()) && !m.dtype().equal(py::dtype::of<uint8_t>()))
      fail("row_mask must have dtype bool or uint8, got ", std::string(py::str(m.dtype())));
    if (m.ndim() != 1 || m.shape(0) != N) fail("row_mask has shape ", shape_str(m), ", expected (", N, ",)");
    if (!(m.flags() & py::array::c_style)) fail("row_mask must be C-contiguous");
    mask = static_cast<const uint8_t*>(m.data());
  }
  float* hp = static_cast<float*>(h.mutable_data());
  pyguard::active_isa();
  py::gil_scoped_release nogil;
  pyguard::cmrm_shift(hp, N, d, vp, static_cast<float>(alpha), mask);
}

py::array_t<float> casa_score(const py::object& H_o, const py::object& cu_o, const py::object& Wk_o,
                              const py::object& q_o, const py::object& w_o, double b,
                              const py::object& w_last_o, const py::object& w_max_o) {
  py::array H = check<float>(H_o, "H", 2);
  const py::ssize_t T = H.shape(0), d = H.shape(1);
  py::array cu = check<int64_t>(cu_o, "cu_seqlens", 1);
  const py::ssize_t B = cu.shape(0) - 1;
  if (B < 0) fail("cu_seqlens is empty: it needs B + 1 entries");
  const int64_t* c = static_cast<const int64_t*>(cu.data());
  if (c[0] != 0) fail("cu_seqlens[0] = ", c[0], ", expected 0");
  for (py::ssize_t i = 0; i < B; ++i)
    if (c[i + 1] <= c[i]) fail("cu_seqlens is not strictly increasing at ", i + 1, ": ", c[i], " then ", c[i + 1]);
  if (c[B] != T) fail("cu_seqlens[-1] = ", c[B], " does not match H's ", T, " rows");
  py::array Wk = check<float>(Wk_o, "Wk", 2, d);
  const py::ssize_t r = Wk.shape(1);
  if (r < 1) fail("Wk has shape ", shape_str(Wk), ": rank r must be >= 1");
  py::array q = check<float>(q_o, "q", 2, -1, r);
  const py::ssize_t heads = q.shape(0);
  if (heads < 1) fail("q has shape ", shape_str(q), ": at least one head is needed");
  py::array w = check<float>(w_o, "w", 1, d);
  if (!std::isfinite(b)) fail("b = ", b, " is not finite");
  check_finite(static_cast<const float*>(Wk.data()), d * r, "Wk");
  check_finite(static_cast<const float*>(q.data()), heads * r, "q");
  check_finite(static_cast<const float*>(w.data()), d, "w");
  py::array w_last, w_max;  // empty unless given
  if (!w_last_o.is_none()) {
    w_last = check<float>(w_last_o, "w_last", 1, d);
    check_finite(static_cast<const float*>(w_last.data()), d, "w_last");
  }
  if (!w_max_o.is_none()) {
    w_max = check<float>(w_max_o, "w_max", 1, d);
    check_finite(static_cast<const float*>(w_max.data()), d, "w_max");
  }
  py::array_t<float> s(B);
  std::fill(s.mutable_data(), s.mutable_data() + B, std::numeric_limits<float>::quiet_NaN());
  const float* Hp = static_cast<const float*>(H.data());
  const float* Wkp = static_cast<const float*>(Wk.data());
  const float* qp = static_cast<const float*>(q.data());
  const float* wp = static_cast<const float*>(w.data());
  const float* wlp = w_last_o.is_none() ? nullptr : static_cast<const float*>(w_last.data());
  const float* wmp = w_max_o.is_none() ? nullptr : static_cast<const float*>(w_max.data());
  float* sp = s.mutable_data();
  pyguard::active_isa();
  {
    py::gil_scoped_release nogil;
    pyguard::casa_score(Hp, T, d, c, B, Wkp, r, qp, heads, wp, wlp, wmp, static_cast<float>(b), sp);
  }
  return s;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyguard CPU kernels (C++17, run-time SIMD dispatch). Use pyguard.ops for the public API.";
  m.def("coca_step", &coca_step, py::arg("base"), py::arg("safe"), py::arg("alpha"),
        py::arg("temperature"), py::arg("force_token") = py::none(), py::arg("out") = py::none(),
        "CoCA step. base, safe, out: float32 [B, V]; alpha, temperature: float32 [B]; "
        "force_token: int64 [B] or None. Returns (token int64 [B], kl float32 [B]).");
  m.def("cmrm_shift_", &cmrm_shift_, py::arg("h"), py::arg("v"), py::arg("alpha"),
        py::arg("layer") = -1, py::arg("row_mask") = py::none(),
        "In place h[n] -= alpha * v on masked rows. h: float32 [N, d]; v: [d] or [L, d] with layer.");
  m.def("casa_score", &casa_score, py::arg("H"), py::arg("cu_seqlens"), py::arg("Wk"), py::arg("q"),
        py::arg("w"), py::arg("b"), py::arg("w_last") = py::none(), py::arg("w_max") = py::none(),
        "CASA score. H: float32 [T, d]; cu_seqlens: int64 [B + 1]; Wk: [d, r]; q: [heads, r]; "
        "w: [d]; w_last: [d] or None (weights of each sequence's last row); w_max: [d] or None "
        "(weights of its rows' maximum per dimension). Returns float32 [B].");
  m.def("isa", [] { return std::string(pyguard::isa_name(pyguard::active_isa())); },
        "The instruction set the kernels use now.");
  m.def("set_isa", [](const std::string& s) { pyguard::set_isa(parse_isa(s)); }, py::arg("isa"),
        "Force an instruction set ('generic' or 'avx2'); ValueError if the CPU lacks it.");
  m.def("isa_supported", [](const std::string& s) { return pyguard::isa_supported(parse_isa(s)); },
        py::arg("isa"));
  m.attr("ISAS") = py::make_tuple("generic", "avx2");
  pyguard::register_capture(m);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
}
