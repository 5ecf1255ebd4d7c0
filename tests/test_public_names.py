"""Every public name of ``storm_lib`` is the kind of object the package docstring says."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import storm_lib

CLASSES = {
    "Batch", "CheckpointError", "Config", "DataError", "History", "Rollout",
    "TrajectoryData", "WorldModel",
}  # fmt: skip


def test_every_public_name_is_the_documented_kind_after_importing_everything() -> None:
    # Importing a submodule sets it as an attribute of the package; a submodule named
    # like a public function (``collect`` once was) would then shadow the function.
    for info in pkgutil.walk_packages(storm_lib.__path__, "storm_lib."):
        if info.name != "storm_lib.__main__":
            importlib.import_module(info.name)
    for name in storm_lib.__all__:
        obj = getattr(storm_lib, name)
        if name in CLASSES:
            assert inspect.isclass(obj), f"storm_lib.{name} is {obj!r}, not a class"
        else:
            assert inspect.isfunction(obj), f"storm_lib.{name} is {obj!r}, not a function"
        assert name in storm_lib.__doc__, f"storm_lib.{name} is not in the package docstring"
