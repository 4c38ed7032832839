"""dsv3_lab: DeepSeek-V3 rebuilt one component at a time.

One module per component (see the README's module map). Import what you need, e.g.
`from dsv3_lab.config import ModelArgs`.
"""

from dsv3_lab.config import ModelArgs, param_counts

__all__ = ["ModelArgs", "param_counts"]
__version__ = "0.1.0"
