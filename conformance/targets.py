"""Targets: how a name on the command line becomes an adapter object."""

from __future__ import annotations

import importlib
import inspect

from .adapters.base import Adapter


def make_adapter(target: str, *, dtype: str | None = None, device: str | None = None) -> Adapter:
    """'impl' | 'spec' | 'transformers' | 'mlx-vlm' | 'llama.cpp' | 'vllm' | 'sglang' | 'files:DIR' | 'package.module:Class'."""
    if target.startswith("files:"):
        from .adapters.files import FilesAdapter

        if device is not None:
            raise ValueError(f"target {target!r}: a files target reads a port's outputs; --device does not apply")
        return FilesAdapter(target[len("files:") :], dtype=dtype)
    builtin = {
        "impl": ("qwen25vl.conformance.adapters.impl", "ImplAdapter"),
        "spec": ("qwen25vl.conformance.adapters.spec", "SpecAdapter"),
        "transformers": ("qwen25vl.conformance.adapters.transformers", "TransformersAdapter"),
        "mlx-vlm": ("qwen25vl.conformance.adapters.mlx_vlm", "MlxVlmAdapter"),
        "llama.cpp": ("qwen25vl.conformance.adapters.llama_cpp", "LlamaCppAdapter"),
        # serving engines on a GPU, judged on tokens and log-probs (docs/serving.md)
        "vllm": ("qwen25vl.conformance.adapters.serving", "VllmAdapter"),
        "sglang": ("qwen25vl.conformance.adapters.serving", "SglangAdapter"),
    }
    if target in builtin:
        mod, cls = builtin[target]
    elif ":" in target:
        mod, cls = target.split(":", 1)
    else:
        raise ValueError(f"target {target!r} is not one of {', '.join(builtin)}, files:DIR, module:Class")
    try:
        try:
            module = importlib.import_module(mod)
        except ImportError:
            import os
            import sys

            if os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())  # a port's adapter module in the current folder, as `python -m` finds it
            module = importlib.import_module(mod)
        klass = getattr(module, cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"target {target!r}: cannot import {mod}.{cls}: {e}") from None
    if not isinstance(klass, type) or not issubclass(klass, Adapter):
        raise ValueError(
            f"target {target!r}: {mod}.{cls} is not a subclass of qwen25vl.conformance.adapters.base.Adapter"
        )
    kwargs = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
    try:
        params = inspect.signature(klass).parameters
    except (TypeError, ValueError):  # a signature Python cannot read: let the call say
        params = None
    takes_any = params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for k in kwargs:
        if not takes_any and k not in params:
            raise ValueError(
                f"target {target!r}: --{k} was given but {cls}() takes no {k!r} argument "
                f"(drop --{k}, or add a {k}= parameter to its constructor)"
            )
    try:
        return klass(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"target {target!r}: {cls}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {e}"
        ) from None
