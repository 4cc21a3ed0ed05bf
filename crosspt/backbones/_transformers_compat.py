"""Every private access crosspt makes into transformers, in one place; tests/test_upstream_shapes.py holds each
against the installed version and fails, naming the shape, when an upgrade moves it."""
from __future__ import annotations


def drop_gguf_quantizer(model) -> None:
    """Make a model read from a GGUF file (`from_pretrained(..., gguf_file=...)`, weights already plain float
    tensors) saveable as an ordinary checkpoint.

    transformers leaves the GGUF quantizer on the model (the attribute `hf_quantizer`, set by `from_pretrained`)
    and its `quantization_config` on the config; `save_pretrained` refuses a model whose quantizer is not
    serializable ("The model is quantized with gguf and is not serializable"), and GGUF's never is. The public
    way out, `model.dequantize()`, raises NotImplementedError for GGUF (its quantizer has no `_dequantize`),
    and `HfQuantizer.remove_quantization_config` also deletes the weight conversions `from_pretrained` applied,
    which `save_pretrained` reverts to write the tensors under the checkpoint's own names. No upstream issue
    asks for saving a dequantised GGUF model; the nearest is huggingface/diffusers#10297 (GGUF serialization)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
