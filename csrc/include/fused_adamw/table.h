// fused_adamw/table.h: the address tables that python/fused_adamw/_native.py
// builds and both native modules (_cpu, _cuda) read: one int64 row per tensor,
// C-contiguous, the columns below. Kept once here so the two modules and the
// Python enums (_native.AdamCol, _native.SgdCol) have one layout to agree on.
#pragma once

#include <cstdint>

namespace fused_adamw {

// Columns of the Adam address table: C-contiguous int64 [n_tensors, kAdamCols].
enum AdamCol : int64_t {
  kAdamNumel = 0,
  kAdamParam = 1,
  kAdamGrad = 2,
  kAdamExpAvg = 3,
  kAdamExpAvgSq = 4,
  kAdamMaxExpAvgSq = 5,  // 0 unless amsgrad
  kAdamStep = 6,         // a float32 scalar on the params' device, incremented by every call
  kAdamAux = 7,          // precision 1: the float32 master copy; 3: the Kahan compensation
                         // (param dtype); else 0
  kAdamIndex = 8,        // the tensor's index in the generator's counter (precision 2)
  kAdamCols = 9,
};

// Columns of the SGD address table: int64 [n_tensors, kSgdCols].
enum SgdCol : int64_t {
  kSgdNumel = 0,
  kSgdParam = 1,
  kSgdGrad = 2,
  kSgdMomentumBuffer = 3,  // 0 when momentum == 0
  kSgdFirstStep = 4,       // 1: the buffer was just allocated, set buf = g
  kSgdAux = 5,             // as kAdamAux
  kSgdStep = 6,            // precision 2: a float32 scalar incremented by every call
                           // (the generator's step); else 0
  kSgdIndex = 7,           // as kAdamIndex
  kSgdCols = 8,
};

}  // namespace fused_adamw
