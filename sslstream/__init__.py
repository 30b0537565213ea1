"""sslstream: streaming self-supervised training for images.

The one name this project installs. The repository keeps its rooms at the top level
(pipelines/, models/, orchestration/, conf/) for readers; the build maps them under this
namespace (setup.py: ``package_dir``), so an installed environment holds
``sslstream.pipelines``, ``sslstream.models``, ``sslstream.orchestration`` and
``sslstream.conf`` and nothing with a generic top-level name that could shadow, or be
shadowed by, a user's own ``models`` or ``pipelines`` package.

``python -m sslstream ...`` is the ``sslstream`` command (sslstream/__main__.py).

From a source checkout that was never installed (``PYTHONPATH=<checkout>``, as on a lent GPU
machine), the rooms sit beside this folder rather than inside it: the checkout's root joins
this package's search path, so ``sslstream.models`` is ``<checkout>/models`` there too. An
installed copy has no setup.py beside it and is left alone.
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "setup.py").is_file() and (_checkout / "orchestration" / "cli.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's own search path)

try:
    __version__ = version("sslstream")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
