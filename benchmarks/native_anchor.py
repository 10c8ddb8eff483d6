"""``python -m fused_xent bench`` with torch's own chunked ``F.linear_cross_entropy`` as an
anchor, on a machine whose torch predates it (the H100 runs torch 2.11; the chunked path came
with torch 2.13).

torch's chunked path is two pure-Python modules on public torch APIs (``torch.library.custom_op``
and ordinary operators): ``torch/nn/modules/linear_cross_entropy.py`` and
``linear_cross_entropy_options.py``. This script loads them from ``TORCH_LCE_DIR`` (copied out of
a torch >= 2.13 install, not part of this repository), installs ``F.linear_cross_entropy`` and
``torch.nn.LinearCrossEntropyOptions`` on the running torch, and runs the bench, whose
``torch_native_chunked`` method then calls them as it would on a newer torch. The dispatch
below follows torch's for the bench's calls (2-d input, int64 class indices, reduction "mean"):
those take the chunked op when ``label_smoothing == 0``; any other call takes
``F.cross_entropy(F.linear(...))``, as torch does (with a warning) for options it cannot honour.
Unlike torch, reduction "none" and probability targets also take that reference path here (the
bench makes no such call).

    cp $(python -c "import torch, os; print(os.path.dirname(torch.__file__))")/nn/modules/linear_cross_entropy*.py DIR
    python -c "import torch; print('torch', torch.__version__)" > DIR/SOURCE
    TORCH_LCE_DIR=DIR PYTHONPATH=. python benchmarks/native_anchor.py gemma2 --only torch_native fused_xent --out OUT
"""

import importlib.util
import os
import sys
import warnings

import torch
import torch.nn.functional as F


def _load(directory: str, name: str):
    spec = importlib.util.spec_from_file_location(f"_torch_lce_{name}", os.path.join(directory, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def install(directory: str) -> None:
    """Put the carried chunked path behind ``F.linear_cross_entropy`` (replacing torch's own, if any)."""
    chunked = _load(directory, "linear_cross_entropy")
    options_module = _load(directory, "linear_cross_entropy_options")

    def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                             ignore_index=None, label_smoothing=0.0, options=None):  # fmt: skip
        index = -100 if ignore_index is None else ignore_index
        applies = options is not None and label_smoothing == 0.0 and target.dtype == torch.int64 and input.dim() == 2
        if not applies or reduction == "none":
            if options is not None:
                warnings.warn("linear_cross_entropy: options ignored (the reference path)", stacklevel=2)
            logits = F.linear(input, linear_weight, linear_bias)
            return F.cross_entropy(logits, target, weight=weight, reduction=reduction, ignore_index=index,
                                   label_smoothing=label_smoothing)  # fmt: skip
        (N, D), C = input.shape, linear_weight.shape[0]
        options = options._adjust(num_batches=N, in_features=D, num_classes=C, dtype=input.dtype, device=input.device)
        grad = torch.is_grad_enabled()
        return chunked._linear_cross_entropy_batch_chunked(
            input, linear_weight, target, linear_bias, weight, reduction, index, label_smoothing,
            options.batch_chunk_size, options.acc_policy, options.acc_dtype, options.allow_retain_graph,
            input.requires_grad and grad, linear_weight.requires_grad and grad,
            linear_bias is not None and linear_bias.requires_grad and grad,
        )[0]  # fmt: skip

    F.linear_cross_entropy = linear_cross_entropy
    torch.nn.LinearCrossEntropyOptions = options_module.LinearCrossEntropyOptions


if __name__ == "__main__":
    directory = os.environ.get("TORCH_LCE_DIR")
    if not directory:
        sys.exit("set TORCH_LCE_DIR to the folder of torch >= 2.13's linear_cross_entropy modules (see the docstring)")
    install(directory)
    from fused_xent import bench

    source = os.path.join(directory, "SOURCE")  # which torch the modules came from, if recorded
    origin = open(source).read().strip() if os.path.exists(source) else "an unrecorded torch"
    bench.COMMAND = f"TORCH_LCE_DIR=<modules of {origin}> python benchmarks/native_anchor.py"
    bench.main(sys.argv[1:])
