"""Capture: the one hook layer (:mod:`.hooks`) and the per-module-kind layer adapters
(:mod:`.adapters`) shared by K-FAC, AdaFisher, Eva and SINGD.

``thermo_kfac.capture.linear_map`` and the adapter classes keep their old import path.
"""

from thermo_kfac.capture.adapters import (
    ADAPTERS,
    EXTRA_ADAPTERS,
    KFAC_APPROXIMATIONS,
    AttentionCapture,
    Conv2dAdapter,
    EmbeddingAdapter,
    LayerAdapter,
    LinearAdapter,
    LinearMap,
    LinearMapAdapter,
    TapHandle,
    add_tap,
    check_attention,
    conv_padding,
    flavour_for,
    flavour_rules,
    linear_map,
    make_adapter,
    tap_hooks,
    trainable_adapters,
)
from thermo_kfac.capture.hooks import (
    batch_size_of,
    candidate_modules,
    capture_hooks,
    compile_skip,
    is_skipped,
    module_linear_maps,
    register_capture,
    remove_handles,
)

__all__ = [
    "ADAPTERS",
    "EXTRA_ADAPTERS",
    "KFAC_APPROXIMATIONS",
    "AttentionCapture",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "LinearMap",
    "LinearMapAdapter",
    "TapHandle",
    "add_tap",
    "batch_size_of",
    "candidate_modules",
    "capture_hooks",
    "check_attention",
    "compile_skip",
    "conv_padding",
    "flavour_for",
    "flavour_rules",
    "is_skipped",
    "trainable_adapters",
    "linear_map",
    "make_adapter",
    "module_linear_maps",
    "register_capture",
    "remove_handles",
    "tap_hooks",
]
