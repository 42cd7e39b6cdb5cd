"""Imported first by ``iwtrainer``: library notices that are not for iwtrainer's users.

bitsandbytes' CPU backend (imported through peft) warns on import, on CPUs with AVX512-BF16, that the optional
``kernels`` package is missing, then uses its own kernel: nothing for a user to act on, and the line would precede
every iwtrainer command's output, including its one-line errors.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
