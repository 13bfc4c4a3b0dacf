// hyper_bindings.h: the pybind11 classes AdamHyper and SgdHyper, the plain
// hyperparameter structs of csrc/include/fused_adamw/update.h, as both native
// modules (_cpu, _cuda) expose them to python/fused_adamw/_native.py.
//
// Generated from the field lists of update.h (FUSED_ADAMW_ADAM_FIELDS,
// FUSED_ADAMW_SGD_FIELDS): a read-write attribute per field, keyword-only
// construction that refuses unknown names, and FIELDS, the names in order,
// which a test compares with python/fused_adamw/hyper.py.
//
// Each module registers its own copy as module-local: the two modules bind the
// same C++ types, and pybind11 refuses a second global registration of a type.
#pragma once

#include <string>

#include <pybind11/pybind11.h>

#include <fused_adamw/update.h>

namespace fused_adamw {

namespace detail {

template <typename Struct>
std::string field_repr(const Struct& h, const char* cls, const pybind11::object& self) {
  namespace py = pybind11;
  std::string out = std::string(cls) + "(";
  bool first = true;
  for (auto name : self.attr("FIELDS")) {
    if (!first) out += ", ";
    first = false;
    const std::string key = py::str(name);
    out += key + "=" + py::repr(self.attr(key.c_str())).cast<std::string>();
  }
  (void)h;
  return out + ")";
}

}  // namespace detail

#define FUSED_ADAMW_BIND_FIELD(type, name, init) cls.def_readwrite(#name, &Struct::name);
#define FUSED_ADAMW_FIELD_NAME(type, name, init) names.append(#name);
#define FUSED_ADAMW_SET_FIELD(type, name, init)                   \
  if (kwargs.contains(#name)) {                                   \
    h.name = kwargs[#name].cast<type>();                          \
    ++used;                                                       \
  }

#define FUSED_ADAMW_BIND_STRUCT(STRUCT, FIELDS, DOC)                                                       \
  {                                                                                                        \
    using Struct = STRUCT;                                                                                 \
    py::class_<Struct> cls(m, #STRUCT, py::module_local(), DOC);                                           \
    cls.def(py::init([](py::kwargs kwargs) {                                                               \
      Struct h;                                                                                            \
      size_t used = 0;                                                                                     \
      FIELDS(FUSED_ADAMW_SET_FIELD)                                                                        \
      if (used != kwargs.size()) throw py::type_error(#STRUCT ": unknown keyword in " +                    \
                                                      py::repr(kwargs).cast<std::string>());               \
      return h;                                                                                            \
    }));                                                                                                   \
    FIELDS(FUSED_ADAMW_BIND_FIELD)                                                                         \
    py::tuple names_tuple;                                                                                 \
    {                                                                                                      \
      py::list names;                                                                                      \
      FIELDS(FUSED_ADAMW_FIELD_NAME)                                                                       \
      names_tuple = py::tuple(names);                                                                      \
    }                                                                                                      \
    cls.attr("FIELDS") = names_tuple;                                                                      \
    cls.def("__repr__", [](py::object self) {                                                              \
      return detail::field_repr(self.cast<const Struct&>(), #STRUCT, self);                                \
    });                                                                                                    \
  }

inline void bind_hyper_structs(pybind11::module_& m) {
  namespace py = pybind11;
  FUSED_ADAMW_BIND_STRUCT(AdamHyper, FUSED_ADAMW_ADAM_FIELDS, "Adam/AdamW hyperparameters of one step (update.h)")
  FUSED_ADAMW_BIND_STRUCT(SgdHyper, FUSED_ADAMW_SGD_FIELDS, "SGD/SGDW hyperparameters of one step (update.h)")
}

#undef FUSED_ADAMW_BIND_STRUCT
#undef FUSED_ADAMW_SET_FIELD
#undef FUSED_ADAMW_FIELD_NAME
#undef FUSED_ADAMW_BIND_FIELD

}  // namespace fused_adamw
