"""Request limits and defaults of the Wan video pipelines, importable without torch (for the client).

Sizes, steps, guidance, seed and prompt length share FLUX's limits (``ditserve.flux.limits``).
"""

#: 15 s at Wan's 16 fps, three times the 81 frames Wan was trained on.
MAX_FRAMES = 241
MAX_FPS = 120

# WanPipeline.__call__'s defaults, and the 16 fps of Wan's own examples (export_to_video).
DEFAULT_HEIGHT, DEFAULT_WIDTH = 480, 832
DEFAULT_FRAMES = 81
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
DEFAULT_FPS = 16
