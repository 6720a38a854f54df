"""Where the `edgefleet` import package comes from (the metadata is in pyproject.toml).

The shared core is the folder `edgefleet/`; the device agent (`agent/`) and the host tool
(`converter/`) stay at the top of the repository and install as `edgefleet.agent` and
`edgefleet.converter` (docs/architecture.md, "One import package"). Subpackages are found, not listed.
"""

from setuptools import find_packages, setup

ROOTS = {"edgefleet": "edgefleet", "edgefleet.agent": "agent", "edgefleet.converter": "converter"}

packages = [
    f"{name}.{sub}" if sub else name
    for name, folder in ROOTS.items()
    for sub in ["", *find_packages(folder)]
]

setup(packages=packages, package_dir=ROOTS, package_data={"edgefleet": ["py.typed"]})
