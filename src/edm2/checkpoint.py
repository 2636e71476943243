"""The former home of every file format; they now live in `edm2.files`. This name stays for existing code."""

from edm2.files import *  # noqa: F403
from edm2.files import __all__  # noqa: F401
