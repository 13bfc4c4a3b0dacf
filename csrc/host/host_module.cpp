// host_module.cpp: fused_adamw._host, the per-step host work of a group's
// plan (python/fused_adamw/plan.py) in one C++ pass.
//
// Every step the plan must read each param's grad, check that params and
// grads still have the metadata it validated (sizes, strides, dtype,
// device, layout) and write the grads' addresses into the address tables.
// From Python that is about 0.8 us per tensor (p.grad alone is 140 ns on a
// Parameter); here it is a walk over the tensors' C++ objects. Unlike _cpu
// and _cuda this module is built against torch's headers and libraries (it
// reads at::Tensor), so it is built only where the build sees torch
// (`pip install --no-build-isolation`), must run under the torch it was
// built with (`torch_version()`; plan.py checks), and is optional: without it
// the plan does the same checks in Python.
//
//   Refresher(params, has, cells, tables)   made by the plan at each build
//   Refresher.refresh(params) -> int        per step: -1 rebuild, else a
//                                           bitmask of tables whose grad
//                                           column changed
//   torch_version()                         torch.__version__ at build time
#include <Python.h>

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

struct Entry {
  PyObject* obj;            // the param (a strong reference)
  PyTypeObject* type;
  bool has_grad;            // whether it had a grad at the build
  caffe2::TypeMeta dtype;
  c10::Device device{c10::kCPU};
  std::vector<int64_t> sizes, strides;
  int64_t numel = 0;
  const void* data = nullptr;  // the param's address at the build
  int64_t* grad_cell = nullptr;  // its grad's cell in an address table
  int table = -1;
};

struct Refresher {
  PyObject_HEAD
  std::vector<Entry>* entries;
  PyObject* tables;  // the numpy arrays the cells point into (kept alive)
  std::vector<c10::TensorImpl*>* scratch;  // refresh()'s two levels of pointers, kept between calls
};

// The Refresher holds the group's params and tables, and a param can hold
// the optimizer (p.opt = opt), so it takes part in the cycle collector.
int refresher_traverse(PyObject* self_, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<Refresher*>(self_);
  if (self->entries)
    for (Entry& e : *self->entries) Py_VISIT(e.obj);
  Py_VISIT(self->tables);
  return 0;
}

int refresher_clear(PyObject* self_) {
  auto* self = reinterpret_cast<Refresher*>(self_);
  if (self->entries) {
    std::vector<Entry>* entries = self->entries;
    self->entries = nullptr;  // refresh() now refuses: "not initialised"
    for (Entry& e : *entries) Py_XDECREF(e.obj);
    delete entries;
  }
  Py_CLEAR(self->tables);
  return 0;
}

void refresher_dealloc(PyObject* self_) {
  auto* self = reinterpret_cast<Refresher*>(self_);
  PyObject_GC_UnTrack(self_);
  refresher_clear(self_);
  delete[] self->scratch;
  self->scratch = nullptr;
  Py_TYPE(self_)->tp_free(self_);
}

bool same_shape(c10::IntArrayRef a, const std::vector<int64_t>& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// A plain strided tensor with storage: what the kernels can read by address.
// Tensors with a Python dispatch key (subclasses such as DTensor) or other
// odd keys are left to the Python path.
bool plain(const c10::TensorImpl& t) {
  const c10::TensorImpl* impl = &t;
  return impl->layout() == c10::kStrided && impl->has_storage() &&
         !impl->key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python,
                                                       c10::DispatchKey::PythonTLSSnapshot,
                                                       c10::DispatchKey::Conjugate,
                                                       c10::DispatchKey::Negative,
                                                       c10::DispatchKey::ZeroTensor}));
}

// Whether t's storage still holds every element t spans (a dense tensor spans
// numel elements from its offset): a storage shrunk under the tensor
// (t.untyped_storage().resize_(n)) fails this.
bool covered(const c10::TensorImpl& t) {
  const c10::Storage& st = t.unsafe_storage();
  auto need = (static_cast<uint64_t>(t.storage_offset()) + static_cast<uint64_t>(t.numel())) * t.itemsize();
  return static_cast<uint64_t>(st.nbytes()) >= need;
}

// Refresher(params, has, cells, tables)
//   params: the group's params (list); has: whether each had a grad at the
//   build (list of bool); cells: for each param with a grad, (table index,
//   row, row length) of its row in tables[table]; tables: list of writable
//   C-contiguous int64 numpy arrays (buffer protocol). The grad column is
//   column 2 of every table (_native.GRAD_COLUMN).
int refresher_init(PyObject* self_, PyObject* args, PyObject* kwargs) {
  auto* self = reinterpret_cast<Refresher*>(self_);
  PyObject *params, *has, *cells, *tables;
  int grad_column;
  static const char* kw[] = {"params", "has", "cells", "tables", "grad_column", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!O!i", const_cast<char**>(kw), &PyList_Type, &params,
                                   &PyList_Type, &has, &PyList_Type, &cells, &PyList_Type, &tables, &grad_column))
    return -1;
  Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyList_GET_SIZE(has) != n) {
    PyErr_SetString(PyExc_ValueError, "has: one flag per param");
    return -1;
  }
  if (self->entries) {
    PyErr_SetString(PyExc_RuntimeError, "Refresher is already initialised");
    return -1;
  }
  std::vector<int64_t*> bases;
  std::vector<Py_ssize_t> rows, cols;
  for (Py_ssize_t k = 0; k < PyList_GET_SIZE(tables); ++k) {
    Py_buffer view;
    if (PyObject_GetBuffer(PyList_GET_ITEM(tables, k), &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0)
      return -1;
    bool ok = view.itemsize == 8 && view.ndim == 2 && view.format && (view.format[0] == 'l' || view.format[0] == 'q');
    bases.push_back(static_cast<int64_t*>(view.buf));
    rows.push_back(ok ? view.shape[0] : 0);
    cols.push_back(ok ? view.shape[1] : 0);
    PyBuffer_Release(&view);  // the array itself is kept alive below, and never resized by the plan
    if (!ok || grad_column < 0 || grad_column >= cols.back()) {
      PyErr_SetString(PyExc_ValueError, "tables: 2-d int64 arrays with a grad column");
      return -1;
    }
  }
  auto entries = new std::vector<Entry>(static_cast<size_t>(n));
  Py_ssize_t c = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    Entry& e = (*entries)[i];
    PyObject* obj = PyList_GET_ITEM(params, i);
    e.obj = obj;
    Py_INCREF(obj);
    e.type = Py_TYPE(obj);
    e.has_grad = PyObject_IsTrue(PyList_GET_ITEM(has, i)) == 1;
    if (!THPVariable_CheckExact(obj)) {
      PyErr_Format(PyExc_TypeError, "params[%zd] is not a plain torch.Tensor or Parameter", i);
      goto fail;
    }
    if (!e.has_grad) continue;
    {
      const at::Tensor& p = THPVariable_Unpack(obj);
      if (!plain(*p.unsafeGetTensorImpl())) {
        PyErr_Format(PyExc_TypeError, "params[%zd] is not a plain strided tensor", i);
        goto fail;
      }
      e.dtype = p.dtype();
      e.device = p.device();
      e.sizes.assign(p.sizes().begin(), p.sizes().end());
      e.strides.assign(p.strides().begin(), p.strides().end());
      e.numel = p.numel();
      e.data = p.const_data_ptr();
      if (c >= PyList_GET_SIZE(cells)) {
        PyErr_SetString(PyExc_ValueError, "cells: one (table, row) per param with a grad");
        goto fail;
      }
      int table;
      Py_ssize_t row;
      if (!PyArg_ParseTuple(PyList_GET_ITEM(cells, c), "in", &table, &row)) goto fail;
      ++c;
      if (table < 0 || table >= static_cast<int>(bases.size()) || row < 0 || row >= rows[table]) {
        PyErr_Format(PyExc_ValueError, "cells[%zd] = (%d, %zd) is outside the tables", c - 1, table, row);
        goto fail;
      }
      e.table = table;
      e.grad_cell = bases[table] + row * cols[table] + grad_column;
    }
  }
  if (c != PyList_GET_SIZE(cells)) {
    PyErr_SetString(PyExc_ValueError, "cells: one (table, row) per param with a grad");
    goto fail;
  }
  if (static_cast<Py_ssize_t>(bases.size()) > 62) {
    PyErr_SetString(PyExc_ValueError, "tables: at most 62");
    goto fail;
  }
  self->entries = entries;
  self->scratch = new std::vector<c10::TensorImpl*>[2];
  Py_INCREF(tables);
  self->tables = tables;
  return 0;
fail:
  for (Entry& e : *entries) Py_XDECREF(e.obj);
  delete entries;
  return -1;
}

// refresh(params) -> int: -1 when anything the plan validated changed (a
// param object, its metadata or address, which params have grads, a grad's
// metadata), so the plan must rebuild; else the bitmask of tables whose grad
// column it rewrote.
//
// Between two steps the forward and backward passes have evicted these
// objects from the caches, and reaching a grad's address is a chain of
// dependent loads (the Python object, its TensorImpl, the autograd meta, the
// grad's TensorImpl, its storage). Walking each chain to its end before the
// next would leave the processor waiting on one miss at a time, so the walk
// goes level by level over all tensors, prefetching the next level a few
// tensors ahead: the misses of different tensors overlap.
PyObject* refresher_refresh(PyObject* self_, PyObject* params) {
  auto* self = reinterpret_cast<Refresher*>(self_);
  if (!self->entries) {
    PyErr_SetString(PyExc_RuntimeError, "Refresher was not initialised");
    return nullptr;
  }
  if (!PyList_Check(params)) {
    PyErr_SetString(PyExc_TypeError, "params must be a list");
    return nullptr;
  }
  std::vector<Entry>& entries = *self->entries;
  const size_t n = entries.size();
  if (PyList_GET_SIZE(params) != static_cast<Py_ssize_t>(n)) return PyLong_FromLong(-1);
  constexpr size_t kAhead = 8;
  std::vector<c10::TensorImpl*>& impls = self->scratch[0];
  std::vector<c10::TensorImpl*>& grads = self->scratch[1];
  impls.assign(n, nullptr);
  grads.assign(n, nullptr);
  uint64_t changed = 0;
  try {
    // Level 1: the params are the objects the plan validated; their TensorImpls.
    for (size_t i = 0; i < n; ++i) {
      const Entry& e = entries[i];
      PyObject* obj = PyList_GET_ITEM(params, static_cast<Py_ssize_t>(i));
      if (obj != e.obj) return PyLong_FromLong(-1);
      if (i + kAhead < n) __builtin_prefetch(entries[i + kAhead].obj);
      if (Py_TYPE(obj) != e.type) return PyLong_FromLong(-1);
      impls[i] = THPVariable_Unpack(obj).unsafeGetTensorImpl();
    }
    for (size_t i = 0; i < n; ++i) __builtin_prefetch(impls[i]);
    // Level 2: each param's metadata, address and grad.
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        c10::TensorImpl* ahead = impls[i + kAhead];
        __builtin_prefetch(ahead->autograd_meta());
        __builtin_prefetch(ahead->unsafe_storage().unsafeGetStorageImpl());
      }
      const Entry& e = entries[i];
      c10::TensorImpl* p = impls[i];
      const at::Tensor& g = p->grad();
      if (g.defined() != e.has_grad) return PyLong_FromLong(-1);
      if (!e.has_grad) continue;
      if (!plain(*p) || p->dtype() != e.dtype || p->device() != e.device || !same_shape(p->sizes(), e.sizes) ||
          !same_shape(p->strides(), e.strides) || p->data() != e.data || !covered(*p))
        return PyLong_FromLong(-1);
      grads[i] = g.unsafeGetTensorImpl();
      __builtin_prefetch(grads[i]);
    }
    // Level 3: each grad's metadata and address, into the table.
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n && grads[i + kAhead]) __builtin_prefetch(grads[i + kAhead]->unsafe_storage().unsafeGetStorageImpl());
      const Entry& e = entries[i];
      c10::TensorImpl* g = grads[i];
      if (!g) continue;
      if (!plain(*g) || g->dtype() != e.dtype || g->device() != e.device || !same_shape(g->sizes(), e.sizes) ||
          (e.numel > 1 && !same_shape(g->strides(), e.strides)) || !covered(*g))
        return PyLong_FromLong(-1);
      auto addr = static_cast<int64_t>(reinterpret_cast<intptr_t>(g->data()));
      if (*e.grad_cell != addr) {
        *e.grad_cell = addr;
        changed |= uint64_t{1} << e.table;
      }
    }
  } catch (const std::exception&) {
    return PyLong_FromLong(-1);  // anything torch refuses to tell: the Python path decides
  }
  return PyLong_FromUnsignedLongLong(changed);
}

PyMethodDef refresher_methods[] = {
    {"refresh", refresher_refresh, METH_O,
     "refresh(params) -> int: -1 if the plan must rebuild, else the bitmask of tables whose grad column changed"},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject RefresherType = {PyVarObject_HEAD_INIT(nullptr, 0)};

#ifndef FUSED_ADAMW_TORCH_VERSION
#error "the build defines FUSED_ADAMW_TORCH_VERSION (torch.__version__ at build time)"
#endif

PyObject* torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(FUSED_ADAMW_TORCH_VERSION); }

PyMethodDef module_methods[] = {
    {"torch_version", torch_version, METH_NOARGS, "torch.__version__ of the torch this module was built against."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_host",
                          "Per-step host work of fused_adamw's plans in C++ (csrc/host/host_module.cpp).", -1,
                          module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__host(void) {
  RefresherType.tp_name = "fused_adamw._host.Refresher";
  RefresherType.tp_basicsize = sizeof(Refresher);
  RefresherType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
  RefresherType.tp_traverse = refresher_traverse;
  RefresherType.tp_clear = refresher_clear;
  RefresherType.tp_new = PyType_GenericNew;
  RefresherType.tp_alloc = PyType_GenericAlloc;
  RefresherType.tp_free = PyObject_GC_Del;
  RefresherType.tp_init = refresher_init;
  RefresherType.tp_dealloc = refresher_dealloc;
  RefresherType.tp_methods = refresher_methods;
  RefresherType.tp_doc = "The per-step check and grad-address refresh of one group's plan (plan.py).";
  if (PyType_Ready(&RefresherType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  Py_INCREF(&RefresherType);
  if (PyModule_AddObject(m, "Refresher", reinterpret_cast<PyObject*>(&RefresherType)) < 0) {
    Py_DECREF(&RefresherType);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
