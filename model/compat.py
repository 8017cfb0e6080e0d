"""Run Megatron-Core's real tensor/pipeline-parallel code on CPU (gloo), for machines without a GPU.

Megatron-Core 0.16 assumes CUDA in a handful of places that are not about computation:
  * `torch.cuda.current_device()` passed as a device argument       -> the CPU device
  * `device="cuda"` literals in pipeline_parallel/schedules.py, transformer/utils.py (default causal mask),
    optimizer/optimizer.py, optimizer/clip_grads.py and utils.py (grad-norm buffers)
                                                                     -> the CPU device, for those modules only
  * `Tensor.cuda()` to move small bookkeeping tensors                -> a no-op returning the tensor
  * `torch.cuda.Stream` / `torch.cuda.current_stream` for overlap    -> inert stand-ins (CPU work is ordered)
  * the CUDA RNG tracker in tensor_parallel/random.py               -> the same tracker over the CPU generator
  * clip_grad_by_total_norm_fp32 asserts grads are 'torch.cuda.FloatTensor' -> the same in-place scaling
  * the bf16 and distributed optimizers accept parameters by `param.type()` in
    ('torch.cuda.FloatTensor', 'torch.cuda.BFloat16Tensor', ...)  -> `Tensor.type()` with no argument names a
                                                                     CPU tensor's CUDA counterpart (Megatron
                                                                     calls it nowhere else)
and one that is about start-up time, not CUDA:
  * `torch.compile` decorating Megatron's fused kernels at import  -> left as plain functions: losses are
                                                                     bit-identical either way, and importing the
                                                                     compiler stack cost every rank about 2.5 s
Everything else (layers, collectives, schedules, optimizer) runs unchanged. `apply()` is a no-op when CUDA is
available, so the GPU path never sees this module's replacements.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch

_APPLIED = False
CPU = torch.device("cpu")
CUDA_LITERAL_MODULES = ("megatron.core.pipeline_parallel.schedules", "megatron.core.transformer.utils",
                        "megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
                        "megatron.core.utils", "megatron.core.optimizer.grad_scaler")


class CpuRNGStatesTracker:
    """Megatron's CudaRNGStatesTracker contract (named RNG streams that `fork()` switches to), over the CPU
    generator. Tensor-parallel ranks get different streams for weights and dropout, exactly as on GPU."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


class _InertStream:
    """Stands in for torch.cuda.Stream: on CPU, operations already run in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_device_kwarg(fn):
    """Wrap a tensor factory so device='cuda' (or cuda:N) means the CPU."""

    def wrapped(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = CPU
        return fn(*args, **kwargs)

    return wrapped


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's in-place clipping (scale every grad by max_norm / total_norm when that is < 1) on CPU grads."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(coeff)


def _type_as_if_on_cuda(tensor_type):
    """Tensor.type(): unchanged with arguments (a conversion); without, 'torch.cuda.X' for a CPU 'torch.X'."""

    def wrapped(self, *args, **kwargs):
        if args or kwargs:
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name

    return wrapped


def _compile_off(model=None, **options):
    """torch.compile's signature as a decorator that leaves the function as it is."""
    return model if model is not None else (lambda fn: fn)


def import_megatron() -> None:
    """Import Megatron-Core; on CPU, with its fused kernels left as plain functions.

    Megatron decorates its fused kernels with torch.compile when its package is imported (megatron/core/jit.py),
    which imports the compiler stack: about 2.5 s of every process's start. Megatron's own disable_jit_fuser() comes
    too late (the package imports the decorated modules first), so the decorator is a no-op while Megatron is
    imported; torch.compile itself is restored after. model/gpt.py calls this before its Megatron imports, so
    every process that builds a model (ranks, export, import) gets it, whichever it imports first."""
    if torch.cuda.is_available() or "megatron.core" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = _compile_off
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_


def apply() -> bool:
    """Install the CPU redirections if (and only if) CUDA is unavailable. Returns whether they are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    import_megatron()
    torch.cuda.current_device = lambda: CPU
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.Stream = _InertStream
    torch.cuda.current_stream = lambda *args, **kwargs: _InertStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.type = _type_as_if_on_cuda(torch.Tensor.type)

    # These modules create tensors with a literal device="cuda": give them a torch whose factories send those
    # to the CPU, leaving the global torch untouched.
    import importlib

    cpu_torch = types.ModuleType("torch_on_cpu")
    cpu_torch.__dict__.update(torch.__dict__)
    for name in ("zeros", "ones", "empty", "tensor", "full"):
        setattr(cpu_torch, name, _cpu_device_kwarg(getattr(torch, name)))
    for module in CUDA_LITERAL_MODULES:
        importlib.import_module(module).torch = cpu_torch

    from megatron.core.optimizer import optimizer as mp_optimizer

    mp_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    from megatron.core.tensor_parallel import random as mp_random

    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random.initialize_rng_tracker(force_reset=True)
    _APPLIED = True
    return True


def manual_seed(seed: int) -> None:
    """Megatron's model_parallel_cuda_manual_seed, valid on both paths (the CPU one seeds torch's generator)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if not _APPLIED:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    offset = seed + 2718  # Megatron's offsets, so CPU and GPU runs seed the same streams
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, offset + parallel_state.get_tensor_model_parallel_rank())
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
