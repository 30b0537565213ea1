"""Package layout for setuptools (the metadata lives in pyproject.toml).

The repository's rooms (pipelines/, models/, orchestration/, conf/) install under the single
``sslstream`` namespace: ``sslstream.models`` is the folder models/, and so on. Nothing is
installed under a generic top-level name (sslstream/__init__.py says why).
"""

from setuptools import find_packages, setup

ROOMS = ("pipelines", "models", "orchestration", "conf")

packages = ["sslstream"]
package_dir = {"sslstream": "sslstream"}
for room in ROOMS:
    package_dir[f"sslstream.{room}"] = room
    packages += [f"sslstream.{p}" for p in find_packages(include=[room, f"{room}.*"])]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"sslstream.conf": ["*.yaml", "*/*.yaml"]},
)
