// hyper_bindings.h: the pybind11 classes AdamHyper and SgdHyper, the plain
// hyperparameter structs of csrc/include/fused_adamw/update.h, as both native
// modules (_cpu, _cuda) expose them to python/fused_adamw/_native.py.
//
// Each module registers its own copy as module-local: the two modules bind the
// same C++ types, and pybind11 refuses a second global registration of a type.
#pragma once

#include <string>

#include <pybind11/pybind11.h>

#include <fused_adamw/update.h>

namespace fused_adamw {

inline void bind_hyper_structs(pybind11::module_& m) {
  namespace py = pybind11;
  const AdamHyper ad;
  py::class_<AdamHyper>(m, "AdamHyper", py::module_local(), "Adam/AdamW hyperparameters of one step (update.h)")
      .def(py::init([](double lr, double beta1, double beta2, double eps, double weight_decay, double decay_coeff,
                       bool decoupled, bool amsgrad, bool maximize) {
             return AdamHyper{lr, beta1, beta2, eps, weight_decay, decay_coeff, decoupled, amsgrad, maximize};
           }),
           py::kw_only(), py::arg("lr") = ad.lr, py::arg("beta1") = ad.beta1, py::arg("beta2") = ad.beta2,
           py::arg("eps") = ad.eps, py::arg("weight_decay") = ad.weight_decay,
           py::arg("decay_coeff") = ad.decay_coeff, py::arg("decoupled") = ad.decoupled,
           py::arg("amsgrad") = ad.amsgrad, py::arg("maximize") = ad.maximize)
      .def_readwrite("lr", &AdamHyper::lr)
      .def_readwrite("beta1", &AdamHyper::beta1)
      .def_readwrite("beta2", &AdamHyper::beta2)
      .def_readwrite("eps", &AdamHyper::eps)
      .def_readwrite("weight_decay", &AdamHyper::weight_decay)
      .def_readwrite("decay_coeff", &AdamHyper::decay_coeff)
      .def_readwrite("decoupled", &AdamHyper::decoupled)
      .def_readwrite("amsgrad", &AdamHyper::amsgrad)
      .def_readwrite("maximize", &AdamHyper::maximize)
      .def("__repr__", [](const AdamHyper& h) {
        return "AdamHyper(lr=" + py::repr(py::float_(h.lr)).cast<std::string>() +
               ", beta1=" + py::repr(py::float_(h.beta1)).cast<std::string>() +
               ", beta2=" + py::repr(py::float_(h.beta2)).cast<std::string>() +
               ", eps=" + py::repr(py::float_(h.eps)).cast<std::string>() +
               ", weight_decay=" + py::repr(py::float_(h.weight_decay)).cast<std::string>() +
               ", decay_coeff=" + py::repr(py::float_(h.decay_coeff)).cast<std::string>() +
               ", decoupled=" + (h.decoupled ? "True" : "False") + ", amsgrad=" + (h.amsgrad ? "True" : "False") +
               ", maximize=" + (h.maximize ? "True" : "False") + ")";
      });

  const SgdHyper sd;
  py::class_<SgdHyper>(m, "SgdHyper", py::module_local(), "SGD/SGDW hyperparameters of one step (update.h)")
      .def(py::init([](double lr, double momentum, double dampening, double weight_decay, double decay_coeff,
                       bool decoupled, bool nesterov, bool maximize) {
             return SgdHyper{lr, momentum, dampening, weight_decay, decay_coeff, decoupled, nesterov, maximize};
           }),
           py::kw_only(), py::arg("lr") = sd.lr, py::arg("momentum") = sd.momentum,
           py::arg("dampening") = sd.dampening, py::arg("weight_decay") = sd.weight_decay,
           py::arg("decay_coeff") = sd.decay_coeff, py::arg("decoupled") = sd.decoupled,
           py::arg("nesterov") = sd.nesterov, py::arg("maximize") = sd.maximize)
      .def_readwrite("lr", &SgdHyper::lr)
      .def_readwrite("momentum", &SgdHyper::momentum)
      .def_readwrite("dampening", &SgdHyper::dampening)
      .def_readwrite("weight_decay", &SgdHyper::weight_decay)
      .def_readwrite("decay_coeff", &SgdHyper::decay_coeff)
      .def_readwrite("decoupled", &SgdHyper::decoupled)
      .def_readwrite("nesterov", &SgdHyper::nesterov)
      .def_readwrite("maximize", &SgdHyper::maximize)
      .def("__repr__", [](const SgdHyper& h) {
        return "SgdHyper(lr=" + py::repr(py::float_(h.lr)).cast<std::string>() +
               ", momentum=" + py::repr(py::float_(h.momentum)).cast<std::string>() +
               ", dampening=" + py::repr(py::float_(h.dampening)).cast<std::string>() +
               ", weight_decay=" + py::repr(py::float_(h.weight_decay)).cast<std::string>() +
               ", decay_coeff=" + py::repr(py::float_(h.decay_coeff)).cast<std::string>() +
               ", decoupled=" + (h.decoupled ? "True" : "False") + ", nesterov=" + (h.nesterov ? "True" : "False") +
               ", maximize=" + (h.maximize ? "True" : "False") + ")";
      });
}

}  // namespace fused_adamw
