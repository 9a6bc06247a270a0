// Python module entry point of the extension. The ops themselves are registered with the
// dispatcher by static initialisers (TORCH_LIBRARY_*) when the shared library is loaded; the
// module only exposes how it was built.
#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

#define NEXTREC_FAST_CONCAT_(a, b) a##b
#define NEXTREC_FAST_CONCAT(a, b) NEXTREC_FAST_CONCAT_(a, b)
#define NEXTREC_FAST_STR_(a) #a
#define NEXTREC_FAST_STR(a) NEXTREC_FAST_STR_(a)

static struct PyModuleDef nextrec_fast_module = {
    PyModuleDef_HEAD_INIT, NEXTREC_FAST_STR(TORCH_EXTENSION_NAME),
    "nextrec_fast C++/CUDA ops (registered under torch.ops.nextrec_fast)", -1, nullptr};

PyMODINIT_FUNC NEXTREC_FAST_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&nextrec_fast_module);
  if (module == nullptr) return nullptr;
#ifdef NEXTREC_FAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
