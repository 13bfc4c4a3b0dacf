"""fused_adamw.triton_kernels: the Triton backend of fused_adamw.

Two launchers with the backend contract of python/fused_adamw/hyper.py:

    adam_step(batch, hyper, *, grad_scale=None, found_inf=None)
    sgd_step(batch, hyper, *, grad_scale=None, found_inf=None)

(batch: a fused_adamw.plan.Batch, the validated tensors of one (device,
dtype) bucket with their address table).

Each updates all tensors of one (device, dtype) group with one launch of the
update kernel (adam.py, sgd.py), hyperparameters passed as runtime float64
arguments (changing lr compiles nothing). Adam adds a second, tiny launch
that increments the step counts (SGD too, under stochastic rounding: the
generator's step counts). hyper.precision picks how results are stored
(round to nearest, master weights, stochastic rounding, Kahan summation;
issue 12), batch.aux and batch.tensor_index carry what the modes need. Runs on CUDA tensors, or on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported), which is how tests/test_triton_kernels.py runs it without a GPU.
setup.py installs this folder as the subpackage fused_adamw.triton_kernels.
"""
from fused_adamw.triton_kernels.adam import adam_step
from fused_adamw.triton_kernels.sgd import sgd_step

__all__ = ["adam_step", "sgd_step"]
