"""Request limits of the FLUX pipelines, importable without torch (the client and CLI use them)."""

MIN_SIZE, MAX_SIZE = 64, 4096
MAX_STEPS = 200
MAX_IMAGES = 8
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1
# Prompts longer than this are almost certainly not prompts; T5 would truncate them anyway.
MAX_PROMPT_CHARS = 20_000
