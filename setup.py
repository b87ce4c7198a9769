"""Packaging: the metadata is in setup.cfg; this file only puts the demo bundle into the wheel.

A runtime-only ``pip install`` must run ``abcd-edge run --budget 150ms`` with no checkout, so the
wheel carries ``abcd_edge/embedded/demo``: the demo artifact with its committed profiles and
controller, laid out and checked by the same ``make_bundle`` as ``abcd-edge bundle``.
Editable installs skip it (a checkout finds export/demo itself).
"""
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithDemoBundle(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not (ROOT / "export" / "demo" / "manifest.json").is_file():
            self.warn("export/demo is absent: the wheel carries no demo bundle (run needs --bundle)")
            return
        sys.path.insert(0, str(ROOT))
        from abcd_edge import paths
        from abcd_edge.formats.bundle import make_bundle
        from abcd_edge.formats.manifest import manifest_hash
        from abcd_edge.runtime.discover import profiles_for

        demo = ROOT / "export" / "demo"
        controller = paths.CALIBRATION_DIR / "demo"
        make_bundle(demo, Path(self.build_lib) / "abcd_edge" / "embedded" / "demo",
                    profiles=profiles_for(manifest_hash(demo)),
                    controller=controller if (controller / "controller.json").is_file() else None)


setup(cmdclass={"build_py": BuildPyWithDemoBundle})
