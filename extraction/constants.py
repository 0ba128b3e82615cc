"""Shared by the models (web) and the runner (worker) without importing torch or Django."""

HOOK_TYPES = ("residual", "mlp", "attention")
VALID_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_SIZES_SENTENCE = f"The batch size must be one of {', '.join(map(str, VALID_BATCH_SIZES))}"
