"""The library's named choices, in a module that imports nothing: the CLI builds its option
enums from them without importing torch (`psal --help` stays fast)."""

# Hole families (shared/data/README.md): name -> ((fraction of pixels low, high),
# (stroke width low, high) in pixels, None for a rectangle).
MASK_FAMILIES = {"thin": ((0.05, 0.15), (3, 9)), "thick": ((0.25, 0.40), (15, 35)), "box": ((0.20, 0.30), None)}

# Upscaling training losses: name -> its torch.nn.functional function.
LOSSES = {"l1": "l1_loss", "l2": "mse_loss"}

# What LR images an upscaler learns from and is measured on: the protocol's clean bicubic
# reduction, or camera-like degradations (psal_cli.degradations: blur, resampling, noise, JPEG).
DEGRADATIONS = ("bicubic", "real")

# The precision of the convolutions on the CPU (engine.resolve_precision).
PRECISIONS = ("auto", "fp32", "bf16")
