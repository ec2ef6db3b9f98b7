"""The package's version, in a module of its own: what writes files names it without importing the
package's ``__init__``."""

__version__ = "0.2.0"
